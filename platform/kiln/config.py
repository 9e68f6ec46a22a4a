"""The config schema: YAML -> typed, validated classes, with dotted key=value overrides.

Every section rejects unknown keys, and every validation error names the dotted key,
so a typo such as ``train.epoch`` fails before any work starts.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kiln.errors import ConfigError


class Section(BaseModel):
    """Base for config sections: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ExperimentConfig(Section):
    name: str = Field("kiln-digits", description="Experiment name; also the registered model's name.")
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; default MLFLOW_TRACKING_URI, else a sqlite file in run_dir."
    )
    run_dir: str = Field("runs", description="Folder for local run outputs: MLflow store, checkpoints, reports.")
    storage_path: str | None = Field(
        None, description="Where Ray Train keeps checkpoints (shared storage on a cluster); default run_dir/checkpoints."
    )


class SplitConfig(Section):
    val: float = Field(0.15, ge=0.0, lt=1.0, description="Fraction of rows held out for validation.")
    test: float = Field(0.15, ge=0.0, lt=1.0, description="Fraction of rows held out for the final test.")
    seed: int = Field(0, description="Seed of the stratified split; same data and seed give the same split.")

    @model_validator(mode="after")
    def _fractions_leave_training_rows(self) -> "SplitConfig":
        if self.val + self.test >= 1.0:
            raise ValueError("val + test must be below 1.0 so that rows are left for training")
        return self


class DataConfig(Section):
    source: str = Field("digits", description="'digits', 'mnist' (built in) or a path to a Parquet file or folder.")
    label: str = Field("label", description="Label column (integers or strings).")
    image: str | None = Field(
        None, description="Image column (PNG/JPEG bytes, or a {bytes, path} struct); absent: tabular features."
    )
    features: list[str] | None = Field(
        None, description="Tabular feature columns; default: every numeric column but the label."
    )
    image_size: tuple[int, int] | None = Field(
        None, description="[height, width] to resize images to; default: the most common stored size."
    )
    split: SplitConfig = Field(default_factory=SplitConfig)


class ModelConfig(BaseModel):
    """``name`` picks the builder; every other key is passed to it (checked against its signature)."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    name: str = Field("cnn", description="'mlp', 'cnn', 'resnet18' or a custom 'package.module:factory'.")

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class CheckpointConfig(Section):
    every: int = Field(1, ge=1, description="Save a checkpoint every N epochs (and after the last).")
    keep: int = Field(2, ge=1, description="Keep the best K checkpoints by `metric`.")
    metric: str = Field("val_f1_macro", description="Metric that ranks checkpoints.")
    mode: Literal["max", "min"] = Field("max", description="Whether a higher or lower `metric` is better.")


class TrainConfig(Section):
    epochs: int = Field(10, ge=1, description="Training epochs.")
    batch_size: int = Field(64, ge=1, description="Global batch size, split across workers.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="Weight decay.")
    optimizer: Literal["adamw", "adam", "sgd"] = Field("adamw", description="Optimizer.")
    scheduler: Literal["cosine", "none"] = Field("cosine", description="Learning-rate schedule over the epochs.")
    workers: int = Field(1, ge=1, description="Ray Train workers (data-parallel replicas).")
    use_gpu: bool = Field(False, description="One GPU per worker, NCCL backend.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker (fractions allowed).")
    seed: int = Field(0, description="Seed for weights, shuffling and dropout.")
    class_weights: Literal["none", "auto"] = Field(
        "none", description="'auto' weights the loss by inverse class frequency of the train split."
    )
    sampler: Literal["none", "oversample", "undersample"] = Field(
        "none", description="Rebalance the train split each epoch: repeat minority or drop majority rows."
    )
    max_failures: int = Field(2, ge=0, description="Worker-group restarts allowed before the run fails.")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)


# Sections of later job kinds live in their own packages and subclass Section (defined above);
# kiln/compress/__init__.py imports this module first, so either import order works.
from kiln.compress.config import CompressConfig  # noqa: E402
from kiln.tune.config import TuneConfig  # noqa: E402  (it subclasses Section, defined above)
from kiln.serve.config import ServeConfig  # noqa: E402  (it subclasses Section, defined above)


class KilnConfig(Section):
    """A whole Kiln config: the train sections, plus one section per later job kind."""

    experiment: ExperimentConfig = Field(default_factory=ExperimentConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    compress: CompressConfig | None = Field(None, description="Post-training compression (kiln compress).")
    tune: TuneConfig | None = Field(None, description="A tuning sweep over the keys above (kiln tune).")
    serve: ServeConfig | None = Field(None, description="Models to serve over HTTP (kiln serve start).")

    @model_validator(mode="after")
    def _model_kwargs_match_builder(self) -> "KilnConfig":
        from kiln.models.registry import check_builder_kwargs

        check_builder_kwargs(self.model.name, self.model.kwargs)
        return self

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain data (what is logged and what reproduces the run)."""
        return self.model_dump(mode="json", exclude_none=False)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """Parse ``key.sub=value`` strings; values are YAML (``3``, ``0.1``, ``[1, 2]``, ``true``).

    Raises ConfigError for a string without ``=`` or with an empty key.
    """
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override '{item}' is not of the form dotted.key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        parsed.append((key, value))
    return parsed


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with the dotted overrides set (intermediate mappings created)."""
    import copy

    result = copy.deepcopy(data)
    for key, value in parse_overrides(overrides):
        node = result
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"config key '{'.'.join(parts[: i + 1])}' is a value, not a section")
            node = child
        node[parts[-1]] = value
    return result


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping. Raises ConfigError for a missing file, bad YAML or a non-mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, not {type(data).__name__}")
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None, schema: type[BaseModel] | None = None):
    """Load, override and validate a config. Returns an instance of ``schema`` (default KilnConfig).

    Raises ConfigError naming the dotted key of the first problem.
    """
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    return validate_config(data, schema or KilnConfig)


def validate_config(data: dict[str, Any], schema: type[BaseModel] | None = None):
    """Validate plain data into ``schema``; raises ConfigError naming the dotted key."""
    schema = schema or KilnConfig
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, schema)) from None


def describe_validation_error(exc: ValidationError, schema: type[BaseModel]) -> str:
    """One line per problem (joined with '; '), each naming the dotted key."""
    messages = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        key = ".".join(loc) if loc else "(config)"
        if err["type"] == "extra_forbidden":
            hint = _suggest(schema, loc)
            messages.append(f"unknown config key '{key}'" + (f" (did you mean '{hint}'?)" if hint else ""))
        elif err["type"] == "value_error":
            msg = str(err.get("ctx", {}).get("error", err["msg"]))
            messages.append(f"config key '{key}': {msg}" if loc else msg)
        else:
            got = err.get("input")
            got_txt = "" if isinstance(got, dict) else f" (got {got!r})"
            messages.append(f"config key '{key}': {err['msg'].lower()}{got_txt}")
    return "; ".join(messages)


def _suggest(schema: type[BaseModel], loc: list[str]) -> str | None:
    """The closest valid dotted key for a mistyped one."""
    model: Any = schema
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return None
        model = field.annotation
        # An optional section (``X | None``): look inside X.
        model = next((a for a in getattr(model, "__args__", ()) if hasattr(a, "model_fields")), model)
    fields = list(getattr(model, "model_fields", {}))
    match = difflib.get_close_matches(loc[-1], fields, n=1)
    return ".".join([*loc[:-1], match[0]]) if match else None
