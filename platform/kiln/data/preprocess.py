"""Preprocessing fitted on the train split only, saved with the model, applied identically at
predict time."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass
class Preprocessing:
    """How raw inputs become model inputs.

    tabular: NaN -> train mean, then (x - mean) / std per feature.
    image: uint8 -> [0, 1], then (x - mean) / std per channel, at a fixed size and channel count.
    """

    kind: str  # "tabular" | "image"
    mean: list[float]
    std: list[float]
    feature_names: list[str] = field(default_factory=list)
    channels: int | None = None
    image_size: list[int] | None = None  # [height, width]

    @property
    def input_shape(self) -> list[int]:
        if self.kind == "image":
            channels, size = self.image_layout()
            return [channels, *size]
        return [len(self.feature_names)]

    def image_layout(self) -> tuple[int, tuple[int, int]]:
        """(channels, (height, width)) of image preprocessing. Raises ValueError for tabular."""
        if self.channels is None or self.image_size is None:
            raise ValueError(f"{self.kind} preprocessing has no image layout")
        height, width = self.image_size
        return int(self.channels), (int(height), int(width))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        return cls(**data)

    def apply(self, raw: np.ndarray) -> np.ndarray:
        """Raw array (uint8 images [N,C,H,W] or float tabular [N,F]) -> float32 model input."""
        mean = np.asarray(self.mean, np.float32)
        std = np.asarray(self.std, np.float32)
        if self.kind == "image":
            x = raw.astype(np.float32) / 255.0
            return ((x - mean[None, :, None, None]) / std[None, :, None, None]).astype(np.float32)
        x = np.asarray(raw, np.float32)
        x = np.where(np.isnan(x), mean[None, :], x)
        return ((x - mean[None, :]) / std[None, :]).astype(np.float32)


def fit_image_preprocessing(train_raw: np.ndarray) -> Preprocessing:
    """Per-channel mean/std of uint8 images ``[N, C, H, W]`` scaled to [0, 1]."""
    x = train_raw.astype(np.float64) / 255.0
    mean = x.mean(axis=(0, 2, 3))
    std = x.std(axis=(0, 2, 3))
    std = np.where(std < 1e-6, 1.0, std)
    return Preprocessing(
        kind="image",
        mean=mean.tolist(),
        std=std.tolist(),
        channels=int(train_raw.shape[1]),
        image_size=[int(train_raw.shape[2]), int(train_raw.shape[3])],
    )


def fit_tabular_preprocessing(train_raw: np.ndarray, feature_names: list[str]) -> Preprocessing:
    """Per-feature standardization, ignoring missing values; constant features keep std 1."""
    with np.errstate(all="ignore"):
        mean = np.nanmean(train_raw.astype(np.float64), axis=0)
        std = np.nanstd(train_raw.astype(np.float64), axis=0)
    mean = np.where(np.isnan(mean), 0.0, mean)
    std = np.where(np.isnan(std) | (std < 1e-12), 1.0, std)
    return Preprocessing(
        kind="tabular", mean=mean.tolist(), std=std.tolist(), feature_names=list(feature_names)
    )
