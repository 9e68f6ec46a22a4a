"""The ``data`` config section: where the rows come from, which columns, and the split."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from kiln.config import Section


class SplitConfig(Section):
    val: float = Field(
        default=0.15, ge=0.0, lt=1.0, description="Fraction of rows held out for validation."
    )
    test: float = Field(
        default=0.15, ge=0.0, lt=1.0, description="Fraction of rows held out for the final test."
    )
    seed: int = Field(
        default=0,
        description="Seed of the stratified split; same data and seed give the same split.",
    )

    @model_validator(mode="after")
    def _fractions_leave_training_rows(self) -> SplitConfig:
        if self.val + self.test >= 1.0:
            raise ValueError("val + test must be below 1.0 so that rows are left for training")
        return self


class DataConfig(Section):
    source: str = Field(
        default="digits",
        description="'digits', 'mnist' (built in) or a path to a Parquet file or folder.",
    )
    label: str = Field(default="label", description="Label column (integers or strings).")
    image: str | None = Field(
        default=None,
        description="Image column (PNG/JPEG bytes, or a {bytes, path} struct); absent: tabular "
        "features.",
    )
    features: list[str] | None = Field(
        default=None,
        description="Tabular feature columns; default: every numeric column but the label.",
    )
    image_size: tuple[int, int] | None = Field(
        default=None,
        description="[height, width] to resize images to; default: the most common stored size.",
    )
    split: SplitConfig = Field(default_factory=SplitConfig)
    sample_rows: int = Field(
        default=5000,
        ge=1,
        le=1_000_000,
        description="Rows of each split the driver keeps (chosen by a seeded key) for model "
        "checks, calibration, the profile's quantiles and the monitoring reference; at most "
        "64 MB a split.",
    )

    def portable(self) -> dict[str, object]:
        """This section as plain data with a local ``source`` made absolute, so that another job
        (``kiln compress`` of the registered model) reads the same rows from another folder."""
        out = self.model_dump(mode="json")
        if self.source not in ("digits", "mnist") and "://" not in self.source:
            out["source"] = str(Path(self.source).expanduser().resolve())
        return out
