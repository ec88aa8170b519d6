"""The RBO paper's models, defined plainly (exact layers in docs/trainer.md), and analytic landscapes.

``build_model(name, input_shape, num_classes)`` with ``input_shape = (C, H, W)``:

- ``logreg``: Flatten → Linear(C·H·W, classes).
- ``mlp``: Flatten → Linear(C·H·W, 256) → ReLU → Linear(256, 256) → ReLU → Linear(256, classes).
- ``resnet6`` / ``resnet8``: 3×3 conv stem (16) + 2 / 3 basic residual blocks (16, 32[, 64] channels,
  stride 2 from the second block) + global average pool + Linear: 6 / 8 weight layers on the main path.
- ``vgg9``: six 3×3 conv-BN-ReLU layers (64, M, 128, M, 256, 256, M, 512, 512, M; M = 2×2 max-pool)
  + global average pool + Linear(512, 512) → ReLU → Linear(512, 512) → ReLU → Linear(512, classes).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from nonlocal_opt.landscapes import LANDSCAPES


def mlp(input_shape, num_classes: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), 256),
        nn.ReLU(),
        nn.Linear(256, 256),
        nn.ReLU(),
        nn.Linear(256, num_classes),
    )


def logreg(input_shape, num_classes: int) -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))


def conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    ]


class BasicBlock(nn.Module):
    """``ReLU(BN(conv(ReLU(BN(conv(x))))) + shortcut(x))``; the shortcut is a 1×1 conv + BN when the
    shape changes, else the identity."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            *conv_bn_relu(in_channels, out_channels, stride),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x):
        return torch.relu(self.body(x) + self.shortcut(x))


def resnet(widths: tuple[int, ...], input_shape, num_classes: int) -> nn.Sequential:
    layers: list[nn.Module] = conv_bn_relu(input_shape[0], 16)
    in_channels = 16
    for index, width in enumerate(widths):
        layers.append(BasicBlock(in_channels, width, stride=1 if index == 0 else 2))
        in_channels = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_channels, num_classes))


def vgg9(input_shape, num_classes: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    in_channels = input_shape[0]
    for item in (64, "M", 128, "M", 256, 256, "M", 512, 512, "M"):
        if item == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += conv_bn_relu(in_channels, item)
            in_channels = item
    return nn.Sequential(
        *layers,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(512, 512),
        nn.ReLU(),
        nn.Linear(512, 512),
        nn.ReLU(),
        nn.Linear(512, num_classes),
    )


MODELS = {
    "mlp": mlp,
    "logreg": logreg,
    "resnet6": lambda shape, classes: resnet((16, 32), shape, classes),
    "resnet8": lambda shape, classes: resnet((16, 32, 64), shape, classes),
    "vgg9": vgg9,
}
CONV_MODELS = ("resnet6", "resnet8", "vgg9")


def build_model(name: str, input_shape, num_classes: int) -> nn.Module:
    """The model ``name`` (one of ``MODELS``) for inputs of shape ``input_shape = (C, H, W)``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(MODELS)}")
    input_shape = tuple(input_shape)
    if name in CONV_MODELS and (len(input_shape) != 3 or min(input_shape[1:]) < 16):
        raise ValueError(f"model {name!r} needs images C×H×W with H, W >= 16, got input shape {input_shape}")
    return MODELS[name](input_shape, num_classes)


class LandscapeModel(nn.Module):
    """An analytic landscape as a model: ``forward(x) = f(θ + x)`` per sample (``x``: shifts ``B×dim``).

    With the zero shifts of :class:`nonlocal_opt.training.data.LandscapeDataset` every per-sample loss is ``f(θ)``.
    """

    def __init__(self, landscape: str, theta0=None):
        super().__init__()
        if landscape not in LANDSCAPES:
            raise ValueError(f"unknown landscape {landscape!r}; available: {', '.join(LANDSCAPES)}")
        self.landscape = LANDSCAPES[landscape](theta0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.landscape.value(self.landscape.theta + x)
