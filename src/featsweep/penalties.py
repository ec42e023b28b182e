"""Image penalties, per image, subtracted from the objective with per-image weights.

Each is a per-pixel mean over the pixel-space image x (B, C, H, W) in [0, 1], so a weight means the
same at every image size (Lucid's versions are sums over the image):

- ``l1``:   mean |x - 0.5|                       (Lucid's L1 about the grey constant 0.5)
- ``l2``:   mean (x - 0.5)^2
- ``tv``:   mean over rows of |x[:, :, i+1] - x[:, :, i]| + mean over columns of the same
            (anisotropic total variation)
- ``blur``: 0.5 mean (x - b(x))^2 with b(x) held fixed, b = Lucent's 3×3 blur (centre weight 1,
            neighbours 0.5, normalized by what the kernel covers at the border): Lucent's
            ``blur_input_each_step``; descending it moves x toward its own blur
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from featsweep.spec import RunSpec

NAMES = ("l1", "l2", "tv", "blur")


def l1(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B,) mean |x - 0.5|."""
    return (x - 0.5).abs().flatten(1).mean(1)


def l2(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B,) mean (x - 0.5)^2."""
    return (x - 0.5).square().flatten(1).mean(1)


def tv(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B,) mean absolute vertical + mean absolute horizontal difference."""
    dy = (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().flatten(1).mean(1)
    dx = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().flatten(1).mean(1)
    return dy + dx


def blur3(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) Lucent's ``_torch_blur``: per channel, a 3×3 kernel (centre 1, neighbours
    0.5) applied with zero padding, divided by the same kernel applied to ones."""
    c = x.shape[1]
    weight = torch.full((c, 1, 3, 3), 0.5, device=x.device, dtype=x.dtype)
    weight[:, :, 1, 1] = 1.0
    total = F.conv2d(x, weight, padding=1, groups=c)
    count = F.conv2d(torch.ones_like(x[:, :1]), weight[:1], padding=1)
    return total / count


def blur(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B,) 0.5 mean (x - blur3(x))^2, blur3(x) without gradient."""
    with torch.no_grad():
        target = blur3(x)
    return 0.5 * (x - target).square().flatten(1).mean(1)


_FUNCTIONS = {"l1": l1, "l2": l2, "tv": tv, "blur": blur}


class Penalties:
    """Per-image penalty weights of a batch; ``penalties(x)`` is the (B,) weighted sum."""

    def __init__(self, specs: Sequence[RunSpec], device: torch.device) -> None:
        self.weights = {}
        for name in NAMES:
            values = [getattr(s.regularizer, name) for s in specs]
            if any(v > 0 for v in values):
                self.weights[name] = torch.tensor(values, device=device)

    @property
    def any(self) -> bool:
        return bool(self.weights)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) pixel images -> (B,) sum of weight * penalty."""
        total = torch.zeros(x.shape[0], device=x.device)
        for name, w in self.weights.items():
            total = total + w * _FUNCTIONS[name](x).float()
        return total


__all__ = ["NAMES", "Penalties", "blur", "blur3", "l1", "l2", "tv"]
