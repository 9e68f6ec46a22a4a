"""The ``model`` config section: the builder's name and its keyword arguments."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ModelConfig(BaseModel):
    """``name`` picks the builder; every other key is passed to it (checked against its
    signature)."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    name: str = Field(
        default="cnn", description="'mlp', 'cnn', 'resnet18' or a custom 'package.module:factory'."
    )

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.model_extra or {})
