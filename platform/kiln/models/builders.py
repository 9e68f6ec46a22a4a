"""Built-in architectures. Each takes (input_shape, num_classes, **kwargs).

``input_shape`` is ``[features]`` for tabular data and ``[channels, height, width]`` for images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


def build_mlp(
    input_shape: Sequence[int],
    num_classes: int,
    hidden: Sequence[int] = (128, 64),
    dropout: float = 0.1,
) -> nn.Module:
    """A multilayer perceptron over the flattened input."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = int(math.prod(input_shape))
    for h in hidden:
        layers += [nn.Linear(width, int(h)), nn.ReLU(), nn.Dropout(dropout)]
        width = int(h)
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def build_cnn(
    input_shape: Sequence[int], num_classes: int, width: int = 32, dropout: float = 0.1
) -> nn.Module:
    """A small VGG-style CNN: three conv blocks, global average pooling, a linear head.

    Plain Conv-BN-ReLU blocks so that structured pruning and int8 quantization apply cleanly.
    """
    if len(input_shape) != 3:
        raise ValueError(f"cnn needs image input [C, H, W], got {list(input_shape)}")
    channels, height, width_px = input_shape
    w = int(width)

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        ]

    layers = [*block(channels, w), *block(w, w)]
    if min(height, width_px) >= 4:
        layers.append(nn.MaxPool2d(2))
    layers += block(w, 2 * w)
    if min(height, width_px) >= 8:
        layers.append(nn.MaxPool2d(2))
    layers += [
        *block(2 * w, 2 * w),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(2 * w, num_classes),
    ]
    return nn.Sequential(*layers)


def build_resnet18(
    input_shape: Sequence[int], num_classes: int, small_input: bool | None = None
) -> nn.Module:
    """torchvision's ResNet-18, no pretrained weights, first conv adapted to the input channels.

    For small images (<= 64 px by default) the stem is a 3x3 stride-1 conv without max pooling,
    as is usual for CIFAR-sized inputs; otherwise the ImageNet stem is kept.
    """
    from torchvision.models import resnet18

    if len(input_shape) != 3:
        raise ValueError(f"resnet18 needs image input [C, H, W], got {list(input_shape)}")
    channels, height, width = input_shape
    model: nn.Module = resnet18(weights=None, num_classes=num_classes)
    small = min(height, width) <= 64 if small_input is None else small_input
    if small:
        model.conv1 = nn.Conv2d(channels, 64, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif channels != 3:
        model.conv1 = nn.Conv2d(channels, 64, 7, stride=2, padding=3, bias=False)
    return model


def count_parameters(model: torch.nn.Module) -> int:
    """Number of parameters (all of them; frozen ones count toward size too)."""
    return sum(p.numel() for p in model.parameters())
