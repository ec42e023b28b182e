"""Networks featsweep does not know, for the model=custom tests (a package outside featsweep).

Each factory is what a researcher would point ``model._target_`` at.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FunctionalBlock(nn.Module):
    """conv -> functional ReLU: the ReLU is a call, not a module (``kind`` picks which call)."""

    def __init__(self, cin: int, cout: int, stride: int, kind: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride, 1)
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.kind == "relu_inplace":
            return F.relu(y, inplace=True)
        if self.kind == "relu6":
            return F.relu6(y)
        if self.kind == "tensor_relu_":
            return y.relu_()
        if self.kind == "gelu":  # no ReLU at all: a pre-ReLU target must be refused
            return F.gelu(y)
        return torch.relu(y)


class SmallNet(nn.Module):
    """features (an nn.Sequential: children "0", "1", ... ), functional blocks, a head.

    features.0 Conv, features.1 ReLU(inplace), features.2 Conv, features.3 ReLU6(inplace);
    then block_a (F.relu in place), block_b (F.relu6), block_c (Tensor.relu_), block_d (GELU).
    """

    def __init__(self, width: int = 8, in_channels: int = 3, classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 2, 1), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, 1, 1), nn.ReLU6(inplace=True))
        self.block_a = FunctionalBlock(width, 2 * width, 2, "relu_inplace")
        self.block_b = FunctionalBlock(2 * width, 2 * width, 1, "relu6")
        self.block_c = FunctionalBlock(2 * width, 2 * width, 1, "tensor_relu_")
        self.block_d = FunctionalBlock(2 * width, 2 * width, 1, "gelu")
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block_d(self.block_c(self.block_b(self.block_a(self.features(x)))))
        return self.head(x.mean(dim=(2, 3)))


def make_small_net(width: int = 8, in_channels: int = 3) -> SmallNet:
    """The factory a config names: model._target_=featsweep_testnets.make_small_net."""
    return SmallNet(width=width, in_channels=in_channels)


def make_sequential(width: int = 4) -> nn.Sequential:
    """A bare nn.Sequential: its layers are named "0", "1", ... (target.layer=3 is module "3")."""
    return nn.Sequential(nn.Conv2d(3, width, 3, 1, 1), nn.ReLU(), nn.Conv2d(width, width, 3, 2, 1),
                         nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width, 3))


class PairOut(nn.Module):
    """A module whose output is a tuple (not a tensor): not targetable."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.conv(x)
        return y, -y


class TupleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pair = PairOut()
        self.mix = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.pair(x)
        return self.mix(torch.cat([a, b], dim=1)).mean(dim=(2, 3))


def not_a_module(width: int = 8) -> list[int]:
    """A factory that returns the wrong thing."""
    return [width]


def broken_factory(width: int = 8) -> nn.Module:
    raise ValueError(f"width {width} is not supported")
