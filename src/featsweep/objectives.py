"""What is maximized, per image: channel, neuron, direction or deepdream, plus diversity.

An objective reads the target tensor of each image, (n, C, h, w) (pre- or post-ReLU, from
``featsweep.targets.LayerReader``), and returns one value per image (what the trace records):

- ``channel``:   mean of channel c over positions (the notes' objective; Lucent's ``channel``)
- ``neuron``:    channel c at one position (x, y); default the centre (w // 2, h // 2), which for
                 even sizes is the lower right of the central 2×2 (Lucent's ``neuron``)
- ``direction``: mean over positions of the cosine similarity between the activation vector and a
                 (C,) direction (Lucent's ``direction``)
- ``deepdream``: mean of the squared activations of the whole layer (Lucid's ``deepdream``)

Diversity (Lucid's ``diversity``): within a ``target.diversity_group``, each image's normalized
Gram matrix G_i = F_i F_i^T / ||F_i F_i^T|| (F_i: (C, h·w)) is pushed away from the others':
image i's term is sum over j != i of <G_i, G_j> / n, weighted by its ``target.diversity``.
Summed over the group this is Lucent's ``diversity`` objective (negated).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from featsweep.errors import config_error
from featsweep.spec import RunSpec
from featsweep.targets import Target

_DIRECTION_TAG = 0x646972  # "dir": the random direction's stream, apart from the start noise


def direction_vector(spec: RunSpec, channels: int) -> torch.Tensor:
    """The (C,) float32 direction of a ``target.kind=direction`` job: read from its .npy file,
    or Gaussian seeded by ``seed`` (``target.direction=random``). ConfigError on a bad file."""
    value = spec.target.direction
    if value == "random":
        g = torch.Generator().manual_seed(spec.seed ^ _DIRECTION_TAG)
        return torch.randn(channels, generator=g)
    path = Path(str(value)).expanduser()
    try:
        vec = np.load(path, allow_pickle=False)
    except Exception as exc:  # unreadable is the user's input, not our bug
        raise config_error("target.direction", str(value), f"could not read it as a .npy array "
                           f"({type(exc).__name__}: {exc})") from None
    vec = np.asarray(vec, dtype=np.float32).reshape(-1) if np.ndim(vec) <= 1 else vec
    if vec.ndim != 1 or vec.shape[0] != channels:
        raise config_error("target.direction", str(value), f"the vector has shape "
                           f"{tuple(np.shape(vec))}, but layer {spec.target.layer} has {channels} "
                           f"channels: give a ({channels},) vector")
    if not np.all(np.isfinite(vec)) or not np.any(vec):
        raise config_error("target.direction", str(value), "the vector must be finite and not "
                           "all zeros")
    return torch.from_numpy(vec.astype(np.float32))


def channel(feats: torch.Tensor, chans: torch.Tensor) -> torch.Tensor:
    """(n, C, h, w), (n,) channels -> (n,) channel means."""
    return feats[torch.arange(feats.shape[0], device=feats.device), chans].float().mean(dim=(1, 2))


def neuron(feats: torch.Tensor, chans: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """(n, C, h, w), (n,) channels, rows, columns -> (n,) single activations."""
    ar = torch.arange(feats.shape[0], device=feats.device)
    return feats[ar, chans, ys, xs].float()


def direction(feats: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """(n, C, h, w), (n, C) directions -> (n,) mean cosine similarity over positions."""
    return F.cosine_similarity(feats.float(), vectors[:, :, None, None], dim=1).mean(dim=(1, 2))


def deepdream(feats: torch.Tensor) -> torch.Tensor:
    """(n, C, h, w) -> (n,) mean squared activation."""
    return feats.float().square().mean(dim=(1, 2, 3))


def gram(feats: torch.Tensor) -> torch.Tensor:
    """(n, C, h, w) -> (n, C, C) Gram matrices, each of Frobenius norm 1."""
    flat = feats.float().flatten(2)
    g = flat @ flat.transpose(1, 2)
    return F.normalize(g.flatten(1), dim=1).view_as(g)


def diversity_terms(grams: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """(B, C, C) normalized Grams, (B,) group ids (-1 = none) -> (B,) sum_{j != i, same group}
    <G_i, G_j> / n_group (0 outside groups)."""
    sim = grams.flatten(1) @ grams.flatten(1).T
    same = (groups[:, None] == groups[None, :]) & (groups[:, None] >= 0)
    same = same & ~torch.eye(len(groups), dtype=torch.bool, device=groups.device)
    size = (same.sum(1) + 1).clamp(min=1).float()
    return (sim * same).sum(1) / size


class Objectives:
    """The objectives of some rows of a batch (one forward's images), built once per batch."""

    def __init__(self, specs: Sequence[RunSpec], rows: Sequence[int], device: torch.device,
                 directions: dict[int, torch.Tensor]) -> None:
        """specs: the whole batch; rows: the positions this forward holds; directions: the (C,)
        vector of each direction row (by batch position)."""
        self.n = len(rows)
        self.parts = []  # (target, kind, local idx (k,), channels, xs, ys, vectors)
        keys: dict[tuple[Target, str], list[int]] = {}
        for k, i in enumerate(rows):
            t = specs[i].target
            keys.setdefault(((t.layer, t.relu), t.kind), []).append(k)
        for (target, kind), local in keys.items():
            members = [specs[rows[k]].target for k in local]
            self.parts.append((
                target, kind, torch.tensor(local, device=device),
                torch.tensor([m.channel for m in members], device=device),
                [m.x for m in members], [m.y for m in members],
                torch.stack([directions[rows[k]] for k in local]).to(device)
                if kind == "direction" else None))
        self._single = len(self.parts) == 1

    def __call__(self, feats: dict[Target, torch.Tensor]) -> torch.Tensor:
        """{target: (n, C, h, w)} -> (n,) float32 objective values."""
        out = None
        for target, kind, local, chans, xs, ys, vectors in self.parts:
            f = feats[target] if self._single else feats[target][local]
            if kind == "channel":
                value = channel(f, chans)
            elif kind == "neuron":
                h, w = f.shape[-2:]
                col = torch.tensor([w // 2 if x is None else x for x in xs], device=f.device)
                row = torch.tensor([h // 2 if y is None else y for y in ys], device=f.device)
                value = neuron(f, chans, row, col)
            elif kind == "direction":
                value = direction(f, vectors)
            else:
                value = deepdream(f)
            if self._single:
                return value
            if out is None:
                out = torch.zeros(self.n, device=f.device, dtype=torch.float32)
            out = out.index_put((local,), value)
        assert out is not None
        return out


__all__ = ["Objectives", "channel", "deepdream", "direction", "direction_vector",
           "diversity_terms", "gram", "neuron"]
