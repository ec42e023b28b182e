"""Random differentiable transforms between the image and the model, per image, every step.

Lucid's ``standard_transforms`` (pad -> jitter -> scale -> rotate -> jitter), batched: every
image has its own settings and its own random draws, so its trajectory never depends on its
batch-mates. The draws for step t of an image depend only on (seed, t): they come from a NumPy
generator seeded with ``SeedSequence([seed, t // CHUNK, TAG])``, drawn CHUNK steps at a time.
So a resumed job redraws exactly what it would have drawn, with no generator state to save.

The geometric part (jitter, scale, rotate, final jitter) is ONE affine warp per image
(``kornia.geometry.transform.warp_affine``, bilinear, zeros outside, ``align_corners=True``): one
interpolation instead of three, and one kernel call for the batch. The model sees
image.size + 2 pad − jitter − jitter_final pixels a side (:meth:`TransformSpec.model_size`), so
images are grouped by (pad, crop): each group is one forward (the usual case, every image with
the same preset, is one group).

Semantics (Lucent 0.1.8's): jitter d is a random crop, ``x[..., dy:dy + H - d, dx:dx + W - d]``
with integers dx, dy uniform in 0..d-1 (so the content moves up/left and nothing from outside
comes in); scale and rotate pick uniformly from their lists and act about the centre of the
image they are given (degrees counter-clockwise); the final jitter crops again. One difference:
Lucent's scale resizes the tensor (its size varies step to step), here it scales about the
centre at a fixed size, so that a batch keeps one shape; and where a rotation reaches past the
first crop's edge, Lucent's chain reads zeros while the one warp reads the padded image there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from kornia.geometry.transform import get_rotation_matrix2d, warp_affine

from featsweep.spec import RunSpec, TransformSpec

CHUNK = 64  # steps drawn at once per image
_TAG = 0x7472616E  # "tran": keeps transform draws apart from other seeded streams


def draw(spec: TransformSpec, seed: int, step: int) -> tuple[float, float, float, float, float, float]:
    """The random draws of one image at `step`: (dx1, dy1, scale, angle, dx2, dy2)."""
    chunk = _chunk(spec, seed, step // CHUNK)
    return tuple(float(v) for v in chunk[step % CHUNK])  # type: ignore[return-value]


def _chunk(spec: TransformSpec, seed: int, index: int) -> np.ndarray:
    """(CHUNK, 6) draws for steps index*CHUNK ... from the stream of (seed, index)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, index, _TAG]))
    j1, j2 = max(spec.jitter, 1), max(spec.jitter_final, 1)
    out = np.empty((CHUNK, 6))
    out[:, 0:2] = rng.integers(0, j1, size=(CHUNK, 2))
    out[:, 2] = np.asarray(spec.scale)[rng.integers(0, len(spec.scale), size=CHUNK)]
    out[:, 3] = np.asarray(spec.rotate)[rng.integers(0, len(spec.rotate), size=CHUNK)]
    out[:, 4:6] = rng.integers(0, j2, size=(CHUNK, 2))
    return out


def affine_matrices(draws: torch.Tensor, height: int, width: int, jitter: int = 0) -> torch.Tensor:
    """(B, 6) draws -> (B, 2, 3) forward affine maps (input -> output pixel coordinates) for an
    input of `height` × `width`: crop at (dx1, dy1) (a shift by −dx1, −dy1) to the
    (H − jitter) × (W − jitter) image, scale and rotate about that image's centre, then crop at
    (dx2, dy2). The output size is the caller's (``warp_affine``'s dsize)."""
    b = draws.shape[0]
    dev, dt = draws.device, draws.dtype
    center = torch.tensor([[(width - jitter - 1) / 2, (height - jitter - 1) / 2]],
                          device=dev, dtype=dt).expand(b, 2)
    scale = draws[:, 2:3].expand(b, 2)
    rs = torch.cat([get_rotation_matrix2d(center, draws[:, 3], scale),
                    torch.tensor([[[0.0, 0.0, 1.0]]], device=dev, dtype=dt).expand(b, 1, 3)], dim=1)
    t1 = torch.eye(3, device=dev, dtype=dt).repeat(b, 1, 1)
    t1[:, 0, 2], t1[:, 1, 2] = -draws[:, 0], -draws[:, 1]
    t2 = torch.eye(3, device=dev, dtype=dt).repeat(b, 1, 1)
    t2[:, 0, 2], t2[:, 1, 2] = -draws[:, 4], -draws[:, 5]
    return (t2 @ rs @ t1)[:, :2]


def pad_images(x: torch.Tensor, pad: int, mode: str, value: torch.Tensor) -> torch.Tensor:
    """(n, C, H, W) -> (n, C, H + 2 pad, W + 2 pad); `value` (n, 1, 1, 1) fills constant pads."""
    if pad == 0:
        return x
    if mode == "constant":
        return F.pad(x - value, [pad] * 4) + value  # each image's own fill value, exactly
    return F.pad(x, [pad] * 4, mode=mode)


@dataclass
class SizeGroup:
    """Images the model sees at one size: one forward per step."""

    rows: list[int]  # positions in the batch
    rows_t: torch.Tensor  # (n,) long
    pad: int
    jitter: int  # the first jitter crop (the rotation centre is that of the cropped image)
    crop: int  # jitter + jitter_final: the output is (H + 2 pad − crop) a side
    size: int  # the side the model sees
    warped: torch.Tensor | None  # (n,) bool: images with a random geometric transform
    transformed: bool  # any image of the group is padded or warped


class RandomTransforms:
    """The transforms of a batch: built once per batch from the RunSpecs."""

    def __init__(self, specs: Sequence[RunSpec], device: torch.device) -> None:
        self.specs = [s.transform for s in specs]
        self.seeds = [s.seed for s in specs]
        self.device = device
        self.size = specs[0].image.size
        self.pad_value = torch.tensor([t.pad_value for t in self.specs], device=device).view(-1, 1, 1, 1)
        self._geometric = [t.geometric for t in self.specs]
        # One forward per input shape: images that pad and crop alike (the first crop too, as
        # it sets the rotation centre).
        by_shape: dict[tuple[int, int, int], list[int]] = {}
        for i, t in enumerate(self.specs):
            by_shape.setdefault((t.pad, t.jitter, t.crop), []).append(i)
        self.groups = []
        for (pad, jitter, crop), rows in sorted(by_shape.items()):
            warped = [self._geometric[i] for i in rows]
            self.groups.append(SizeGroup(
                rows=rows, rows_t=torch.tensor(rows, device=device), pad=pad, jitter=jitter,
                crop=crop, size=self.specs[rows[0]].model_size(self.size),
                warped=torch.tensor(warped, device=device) if any(warped) else None,
                transformed=pad > 0 or any(warped)))
        self._cache: dict[tuple[int, int], np.ndarray] = {}

    @property
    def any_active(self) -> bool:
        return any(g.transformed for g in self.groups)

    def draws(self, rows: Sequence[int], step: int) -> torch.Tensor:
        """(n, 6) float32 draws of `rows` at `step` (identity draws for images without them)."""
        out = np.zeros((len(rows), 6))
        out[:, 2] = 1.0
        index = step // CHUNK
        for k, i in enumerate(rows):
            if not self._geometric[i]:
                continue
            key = (i, index)
            if key not in self._cache:
                self._cache = {k2: v for k2, v in self._cache.items() if k2[1] >= index}
                self._cache[key] = _chunk(self.specs[i], self.seeds[i], index)
            out[k] = self._cache[key][step % CHUNK]
        return torch.from_numpy(out).float().to(self.device)

    def apply(self, group: SizeGroup, images: torch.Tensor, step: int,
              draws: torch.Tensor | None = None) -> torch.Tensor:
        """(n, C, H, W) pixel images of `group` (batch order of its rows) -> (n, C, H', W').

        `draws`: the group's (n, 6) draws for this step, when the caller drew them already
        (``self.draws(group.rows, step)``; the engine does, outside its compiled step)."""
        if not group.transformed:
            return images
        x = images
        if group.pad:
            modes = {self.specs[i].pad_mode for i in group.rows}
            value = self.pad_value[group.rows_t]
            if len(modes) == 1:
                x = pad_images(x, group.pad, modes.pop(), value)
            else:
                x = torch.cat([pad_images(x[k:k + 1], group.pad, self.specs[i].pad_mode,
                                          value[k:k + 1]) for k, i in enumerate(group.rows)])
        if group.warped is not None:
            h, w = x.shape[-2:]
            d = self.draws(group.rows, step) if draws is None else draws
            m = affine_matrices(d, h, w, group.jitter)
            warped = warp_affine(x, m.to(x.dtype), dsize=(h - group.crop, w - group.crop),
                                 mode="bilinear", padding_mode="zeros", align_corners=True)
            # Images without a geometric transform share the shape only when nothing is cropped.
            x = warped if group.crop else torch.where(group.warped.view(-1, 1, 1, 1), warped, x)
        return x



__all__ = ["CHUNK", "RandomTransforms", "SizeGroup", "affine_matrices", "draw", "pad_images"]
