"""Image parameterizations: how the optimized parameters become the image, batched.

The contract (Lucent's ``param_f`` returns ``(params, image_f)``; here per image of a batch):

- :class:`ImageParams` holds one or more *groups*; each group is one leaf tensor that the
  optimizer updates (its rows are images of the batch) and the rule that turns it into images.
- ``image()`` -> (B, C, H, W) pixel-space image in [0, 1] (graph attached to the leaves).
- ``model_input()`` -> (B, C, H, W) normalized input for images without transforms: for the notes'
  setting (param=pixel, image.space=normalized) this is the optimized tensor itself, bit for bit.
- ``project(new_images, rows)``: set the parameters of `rows` so that their image becomes
  `new_images` (the post-step clamp and blur of the notes; exact inverse of every rule).

Groups by kind and space: ``pixel`` (the tensor is the image, in pixel or normalized units; with
``decorrelate`` / ``squash=sigmoid`` it is Lucid's pre-sigmoid pixel image) and ``fft`` (Lucid's
spectrum, (n, C, H, W//2 + 1 (+1 if W is odd), 2), scaled by 1 / max(f, 1/max(H, W)) ** decay,
inverse real FFT with ``norm="ortho"``, divided by 4 like Lucid). Decorrelation multiplies the
channels by Lucid's ImageNet colour matrix (normalized by its largest column norm); with no squash
the colour mean (decorrelated) or 0.5 (fft) is added so that a zero parameter is a mid-grey image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from featsweep.spec import RunSpec

# Lucid's colour correlation (the square root of ImageNet's colour covariance, from its SVD).
_COLOR_SVD_SQRT = np.asarray([[0.26, 0.09, 0.02],
                              [0.27, 0.00, -0.05],
                              [0.27, -0.09, 0.03]], dtype=np.float32)
COLOR_MATRIX = _COLOR_SVD_SQRT / np.max(np.linalg.norm(_COLOR_SVD_SQRT, axis=0))
COLOR_MEAN = (0.48, 0.46, 0.41)  # Lucid's colour mean, added to decorrelated unsquashed images
FFT_MAGIC = 4.0  # Lucid divides the inverse FFT by 4 ("reduces saturation")
DEFAULT_SD = 0.01  # Lucid's default std of the starting parameters
_LOGIT_EPS = 1e-6  # sigmoid inverse: images are clamped into [eps, 1 - eps] first


def rfft2d_freqs(h: int, w: int) -> np.ndarray:
    """(h, w // 2 + 1 (+1 for odd w)) radial frequencies in cycles/pixel of a real 2-D FFT
    (Lucid's layout: an odd width keeps one more column, cut off after the inverse)."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.fftfreq(w)[: w // 2 + (2 if w % 2 else 1)]
    return np.sqrt(fx * fx + fy * fy)


def spectrum_scale(h: int, w: int, decay: float) -> np.ndarray:
    """1 / max(f, 1/max(h, w)) ** decay, shape like :func:`rfft2d_freqs`."""
    return 1.0 / np.maximum(rfft2d_freqs(h, w), 1.0 / max(w, h)) ** decay


def decorrelate(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) decorrelated colour -> RGB (Lucid's ``_linear_decorrelate_color``)."""
    m = torch.as_tensor(COLOR_MATRIX, device=x.device, dtype=x.dtype)
    return (x.permute(0, 2, 3, 1) @ m.T).permute(0, 3, 1, 2)


def correlate(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`decorrelate`: (B, 3, H, W) RGB -> decorrelated colour."""
    m_inv = torch.as_tensor(np.linalg.inv(COLOR_MATRIX), device=x.device, dtype=x.dtype)
    return (x.permute(0, 2, 3, 1) @ m_inv.T).permute(0, 3, 1, 2)


def _col(values: Sequence[float | bool], device: torch.device, ndim: int = 4,
         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device).view(-1, *([1] * (ndim - 1)))


@dataclass
class ParamGroup:
    """Images of one kind and space: rows (n,) of the batch, their leaf tensor and rules."""

    kind: str  # "pixel" | "fft"
    space: str  # "pixel" | "normalized" (pixel kind only)
    rows: torch.Tensor  # (n,) long, positions in the batch
    rows_list: list[int]
    tensor: torch.Tensor  # pixel: (n, C, H, W); fft: (n, C, H, W2, 2)
    decor: torch.Tensor | None  # (n,1,1,1) bool, or None when no image decorrelates
    sigmoid: torch.Tensor | None  # (n,1,1,1) bool, or None when no image squashes
    scale: torch.Tensor | None  # fft: (n, 1, H, W2, 1) spectrum scale per image
    plain: bool  # every image: pixel kind, no decorrelate, no squash (the notes)


class ImageParams:
    """The parameters of a batch of B images and their map to pixel-space images."""

    def __init__(self, specs: Sequence[RunSpec], channels: int, mean: Sequence[float],
                 std: Sequence[float], device: torch.device,
                 memory_format: torch.memory_format = torch.contiguous_format) -> None:
        size = specs[0].image.size
        self.batch, self.channels, self.size, self.device = len(specs), channels, size, device
        self.mean = torch.tensor(list(mean), device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(list(std), device=device).view(1, -1, 1, 1)
        self.groups: list[ParamGroup] = []
        keys: dict[tuple[str, str], list[int]] = {}
        for i, s in enumerate(specs):
            keys.setdefault((s.param.kind, s.image.space), []).append(i)
        for (kind, space), rows in keys.items():
            members = [specs[i] for i in rows]
            tensor = torch.stack([initial_params(s, channels, self.mean, self.std)
                                  for s in members]).to(device)
            if tensor.dim() == 4:  # pixel tensors in the batch's layout (see engine.memory_format)
                tensor = tensor.contiguous(memory_format=memory_format)
            decor = [s.param.decorrelate for s in members]
            sig = [s.param.squash == "sigmoid" for s in members]
            scale = None
            if kind == "fft":
                scale = torch.stack([torch.from_numpy(spectrum_scale(size, size, s.param.decay))
                                     .float() for s in members])[:, None, :, :, None].to(device)
            self.groups.append(ParamGroup(
                kind=kind, space=space, rows=torch.tensor(rows, device=device), rows_list=rows,
                tensor=tensor, decor=_col(decor, device, dtype=torch.bool) if any(decor) else None,
                sigmoid=_col(sig, device, dtype=torch.bool) if any(sig) else None, scale=scale,
                plain=kind == "pixel" and not any(decor) and not any(sig)))
        self._single = len(self.groups) == 1

    @property
    def tensors(self) -> list[torch.Tensor]:
        return [g.tensor for g in self.groups]

    # ----------------------------------------------------------------------------- forward maps
    def group_image(self, g: ParamGroup, tensor: torch.Tensor | None = None) -> torch.Tensor:
        """(n, C, H, W) pixel-space images of group `g` (from `tensor`, default its leaf)."""
        t = g.tensor if tensor is None else tensor
        if g.kind == "fft":
            spectrum = torch.view_as_complex((g.scale * t).contiguous())
            x = torch.fft.irfftn(spectrum, s=(self.size, self.size), norm="ortho") / FFT_MAGIC
        elif g.space == "normalized":
            x = t * self.std + self.mean
        else:
            x = t
        if g.plain:
            return x
        if g.decor is not None:
            x = torch.where(g.decor, decorrelate(x), x)
        offset = self._offset(g)
        if g.sigmoid is not None:
            return torch.where(g.sigmoid, torch.sigmoid(x), x + offset)
        return x + offset

    def _offset(self, g: ParamGroup) -> torch.Tensor:
        """What an unsquashed image adds: colour mean (decorrelated), 0.5 (fft), else 0."""
        base = torch.full((1, self.channels, 1, 1), 0.5 if g.kind == "fft" else 0.0,
                          device=self.device)
        if g.decor is None:
            return base
        mean = torch.tensor(COLOR_MEAN, device=self.device).view(1, 3, 1, 1)
        return torch.where(g.decor, mean, base)

    def _gather(self, parts: list[torch.Tensor]) -> torch.Tensor:
        if self._single:
            return parts[0]
        out = parts[0].new_empty((self.batch, *parts[0].shape[1:]))
        for g, part in zip(self.groups, parts):
            out = out.index_copy(0, g.rows, part)
        return out

    def image(self, tensors: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """(B, C, H, W) pixel-space images, in batch order."""
        tensors = tensors if tensors is not None else self.tensors
        return self._gather([self.group_image(g, t) for g, t in zip(self.groups, tensors)])

    def model_input(self, tensors: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """(B, C, H, W) normalized model input of the untransformed images. The notes' normalized
        pixel tensor goes in as it is (no round trip through pixel space)."""
        tensors = tensors if tensors is not None else self.tensors
        parts = []
        for g, t in zip(self.groups, tensors):
            if g.plain and g.space == "normalized":
                parts.append(t)
            else:
                parts.append((self.group_image(g, t) - self.mean) / self.std)
        return self._gather(parts)

    # ---------------------------------------------------------------------------- inverse maps
    def group_params(self, g: ParamGroup, images: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`group_image`: parameters whose image is `images` (n, C, H, W)."""
        x = images
        if not g.plain:
            offset = self._offset(g)
            if g.sigmoid is not None:
                logit = torch.logit(x.clamp(_LOGIT_EPS, 1 - _LOGIT_EPS))
                x = torch.where(g.sigmoid, logit, x - offset)
            else:
                x = x - offset
            if g.decor is not None:
                x = torch.where(g.decor, correlate(x), x)
        if g.kind == "pixel":
            return (x - self.mean) / self.std if g.space == "normalized" else x
        spectrum = torch.view_as_real(torch.fft.rfftn(x * FFT_MAGIC, dim=(-2, -1), norm="ortho"))
        w2 = g.tensor.shape[-2]
        if spectrum.shape[-2] < w2:  # odd width: Lucid keeps one unused column; leave it be
            spectrum = torch.cat([spectrum, g.tensor[..., spectrum.shape[-2]:, :]], dim=-2)
        return spectrum / g.scale

    @torch.no_grad()
    def project(self, g: ParamGroup, images: torch.Tensor, mask: torch.Tensor) -> None:
        """Set group `g`'s parameters where `mask` (n,) is true so that its images become
        `images` (n, C, H, W); other rows keep their parameters."""
        new = self.group_params(g, images)
        shape = (-1,) + (1,) * (g.tensor.dim() - 1)
        g.tensor.copy_(torch.where(mask.view(shape), new, g.tensor))



def initial_params(spec: RunSpec, channels: int, mean: torch.Tensor,
                   std: torch.Tensor) -> torch.Tensor:
    """One image's starting parameters on the CPU, seeded by ``spec.seed`` (device-independent).

    pixel, no decorrelate/squash, init_sd null: the notes' start, uniform noise in [0, 1) in
    pixel space (mapped to normalized units when image.space=normalized); with init_sd, mid-grey
    plus N(0, init_sd) noise. Otherwise (decorrelate, sigmoid, fft) N(0, sd) parameters, sd =
    init_sd or 0.01 (Lucid's), which the offset or sigmoid turns into a near-grey image.
    """
    g = torch.Generator().manual_seed(spec.seed)
    size, p = spec.image.size, spec.param
    if p.kind == "pixel" and p.is_plain and p.init_sd is None:
        x = torch.rand(channels, size, size, generator=g)
        if spec.image.space == "normalized":
            x = (x - mean[0].cpu()) / std[0].cpu()
        return x
    sd = DEFAULT_SD if p.init_sd is None else p.init_sd
    if p.kind == "pixel":
        x = torch.randn(channels, size, size, generator=g) * sd
        if p.is_plain:
            x = x + 0.5
            if spec.image.space == "normalized":
                x = (x - mean[0].cpu()) / std[0].cpu()
        return x
    freqs = rfft2d_freqs(size, size)
    return torch.randn(channels, *freqs.shape, 2, generator=g) * sd


__all__ = ["COLOR_MATRIX", "COLOR_MEAN", "ImageParams", "ParamGroup", "correlate", "decorrelate",
           "initial_params", "rfft2d_freqs", "spectrum_scale"]
