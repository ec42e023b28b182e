"""Quality of a visualization, measured with the network it was made for.

Per job (docs/metrics.md):

- ``quality.robustness`` — the mean activation of the final image under 16 random
  jitter/scale/rotate draws (kornia's affine warp, seeded) divided by its clean activation. 1: the
  pattern survives small moves, as a real feature does; near 0 (or negative): the image exploits
  one exact pixel alignment.
- ``quality.natural_ratio`` — the final activation divided by the highest activation of the same
  channel over a pool of natural image crops (scikit-image's bundled photographs, or the user's
  folder, e.g. an ImageNet validation split). > 1: the visualization excites the channel more than
  any natural crop in the pool.
- ``quality.seed_diversity`` — per setting across seeds (jobs equal in every config leaf but
  ``seed``): the mean over pairs of 1 − cosine similarity of the target layer's activations
  (flattened C·h·w). 0: every seed found the same pattern; 1: orthogonal patterns.

Dataset examples (:func:`dataset_examples`): per target channel, the top-k crops of the pool with
their activations, shown in the report beside the channel's visualizations (as Lucid and OpenAI
Microscope readers expect).

All network work goes through :func:`featsweep.engine.load_network` and
:class:`featsweep.targets.LayerReader`, so the truncated forward and the pre-/post-ReLU tensor
are exactly those that were optimized. CPU by default; nothing is downloaded.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

__all__ = [
    "N_DRAWS", "QUALITY_COLUMNS", "Examples", "add_quality", "dataset_examples", "examples_section",
    "natural_pool", "natural_ratio", "robustness", "seed_diversity",
]

QUALITY_COLUMNS: tuple[str, ...] = ("quality.robustness", "quality.natural_ratio",
                                    "quality.seed_diversity")
N_DRAWS = 16  # random jitter/scale/rotate draws per image
JITTER = 0.0625  # largest shift, as a share of the side (±6 px at 96 px)
SCALE = (0.9, 1.1)  # zoom range
DEGREES = 10.0  # largest rotation, degrees
TOP_K = 6  # dataset examples per channel
# scikit-image's bundled photographs (no download): colour ones, then greyscale as RGB.
SKIMAGE_PHOTOS: tuple[str, ...] = (
    "astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
    "camera", "coins", "moon", "text", "clock", "page",
)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

Features = Callable[[torch.Tensor], torch.Tensor]  # (B, C_in, H, W) pixels -> (B, C, h, w)


# --------------------------------------------------------------------------------------------
# The metrics, on any feature function


def _channel_means(features: Features, images: torch.Tensor, channels: torch.Tensor,
                   batch: int = 64) -> torch.Tensor:
    """(N,) mean of channel ``channels[i]`` of ``features(images[i])``, batched."""
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            feats = features(images[start:start + batch])
            rows = torch.arange(feats.shape[0])
            out.append(feats[rows, channels[start:start + batch]].mean(dim=(-2, -1)))
    return torch.cat(out) if out else torch.zeros(0)


def random_views(images: torch.Tensor, n_draws: int = N_DRAWS, *, seed: int = 0,
                 jitter: float = JITTER, scale: tuple[float, float] = SCALE,
                 degrees: float = DEGREES) -> torch.Tensor:
    """``n_draws`` jittered, scaled and rotated copies of each image: (N·n_draws, C, H, W).

    Copies of image i are rows i·n_draws … (i+1)·n_draws − 1. Each draw is uniform in shift
    ±``jitter``·side, zoom ``scale`` and angle ±``degrees``, from a ``torch.Generator`` seeded
    with ``seed``; the warp is :func:`kornia.geometry.transform.warp_affine` with reflected
    borders, so no black frame enters the image.
    """
    import kornia

    n, _, h, w = images.shape
    gen = torch.Generator().manual_seed(int(seed))
    count = n * n_draws
    u = torch.rand(count, 4, generator=gen, dtype=torch.float64).to(images.dtype)
    shift = (u[:, :2] * 2 - 1) * jitter * torch.tensor([w, h], dtype=images.dtype)
    zoom = scale[0] + u[:, 2] * (scale[1] - scale[0])
    angle = (u[:, 3] * 2 - 1) * degrees
    center = torch.tensor([[(w - 1) / 2, (h - 1) / 2]], dtype=images.dtype).expand(count, 2)
    matrix = kornia.geometry.transform.get_affine_matrix2d(
        shift, center, zoom[:, None].expand(count, 2), angle)[:, :2]
    repeated = images.repeat_interleave(n_draws, dim=0)
    return kornia.geometry.transform.warp_affine(repeated, matrix, (h, w), padding_mode="reflection",
                                                 align_corners=True)


def robustness(features: Features, images: torch.Tensor, channels: Sequence[int], *,
               n_draws: int = N_DRAWS, seed: int = 0, **draws: Any) -> np.ndarray:
    """(N,) mean activation over ``n_draws`` random views ÷ clean activation (NaN where the clean
    activation is 0). ``images``: (N, C, H, W) pixels; ``draws``: :func:`random_views` ranges."""
    ch = torch.as_tensor(list(channels), dtype=torch.long)
    clean = _channel_means(features, images, ch)
    views = random_views(images, n_draws, seed=seed, **draws)
    moved = _channel_means(features, views, ch.repeat_interleave(n_draws)).view(-1, n_draws).mean(1)
    clean_np, moved_np = clean.double().numpy(), moved.double().numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(clean_np != 0, moved_np / clean_np, np.nan)


def natural_ratio(features: Features, images: torch.Tensor, channels: Sequence[int],
                  pool: torch.Tensor) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """(N,) clean activation ÷ the channel's highest activation over ``pool`` (M, C, H, W), and
    per channel the pool's activations (M,) (for the dataset examples)."""
    ch = list(channels)
    clean = _channel_means(features, images, torch.as_tensor(ch, dtype=torch.long)).double().numpy()
    per_channel: dict[int, np.ndarray] = {}
    with torch.no_grad():
        for start in range(0, len(pool), 64):
            feats = features(pool[start:start + 64]).mean(dim=(-2, -1))  # (b, C)
            for c in set(ch):
                per_channel.setdefault(c, []).append(feats[:, c].double().numpy())  # type: ignore[arg-type]
    acts = {c: np.concatenate(v) for c, v in per_channel.items()}  # type: ignore[arg-type]
    best = np.array([acts[c].max() for c in ch]) if ch else np.zeros(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(best > 0, clean / best, np.nan), acts


def seed_diversity(activations: np.ndarray) -> float:
    """Mean over pairs of 1 − cosine similarity of (S, ...) activations (S ≥ 2 seeds).

    NaN for fewer than two seeds or a pair with an all-zero activation.
    """
    flat = np.asarray(activations, dtype=float).reshape(len(activations), -1)
    if len(flat) < 2:
        return math.nan
    norms = np.linalg.norm(flat, axis=1)
    values = []
    for i, j in combinations(range(len(flat)), 2):
        if norms[i] == 0 or norms[j] == 0:
            return math.nan
        values.append(1.0 - float(flat[i] @ flat[j]) / (norms[i] * norms[j]))
    return float(np.mean(values))


# --------------------------------------------------------------------------------------------
# The natural pool


def _to_rgb(image: np.ndarray) -> np.ndarray:
    arr = np.asarray(image)
    if arr.dtype == bool:
        arr = arr.astype(np.float32)
    elif np.issubdtype(arr.dtype, np.integer):
        arr = arr.astype(np.float32) / float(np.iinfo(arr.dtype).max)
    arr = arr.astype(np.float32)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    return np.clip(arr[..., :3], 0.0, 1.0)


@lru_cache(maxsize=1)
def _bundled_photos() -> tuple[tuple[str, np.ndarray], ...]:
    from skimage import data

    return tuple((name, _to_rgb(getattr(data, name)())) for name in SKIMAGE_PHOTOS)


def _load_photos(directory: str | Path | None) -> list[tuple[str, np.ndarray]]:
    if directory is None:
        return list(_bundled_photos())
    from PIL import Image

    root = Path(directory)
    if not root.is_dir():
        from featsweep.errors import UserError

        raise UserError(f"featsweep.analysis: --natural {str(root)!r} is not a directory; give a "
                        "folder of .png/.jpg images (searched recursively), e.g. an ImageNet "
                        "validation split.")
    out = []
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        try:
            with Image.open(path) as im:
                out.append((path.name, np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0))
        except OSError:
            continue  # not an image after all: skip it
    if not out:
        from featsweep.errors import UserError

        raise UserError(f"featsweep.analysis: --natural {str(root)!r} holds no readable image "
                        f"({', '.join(IMAGE_SUFFIXES)}).")
    return out


def natural_pool(size: int, directory: str | Path | None = None, *,
                 grid: int = 3, max_images: int = 500) -> tuple[torch.Tensor, list[str]]:
    """Square crops of the natural photos, resized to ``size``: (M, 3, size, size) in [0, 1].

    Per photo: the largest centred square and a ``grid``×``grid`` grid of squares of half the
    short side (so objects appear at two scales). Labels say which photo and crop.
    """
    import torch.nn.functional as F

    crops, labels = [], []
    for name, photo in _load_photos(directory)[:max_images]:
        h, w = photo.shape[:2]
        side = min(h, w)
        boxes = [((h - side) // 2, (w - side) // 2, side, "centre")]
        half = side // 2
        for r in range(grid):
            for c in range(grid):
                top = round(r * (h - half) / max(1, grid - 1))
                left = round(c * (w - half) / max(1, grid - 1))
                boxes.append((top, left, half, f"{r},{c}"))
        for top, left, s, where in boxes:
            crop = torch.from_numpy(np.ascontiguousarray(photo[top:top + s, left:left + s])).permute(2, 0, 1)
            crops.append(F.interpolate(crop[None], size=(size, size), mode="area")[0])
            labels.append(f"{name} {where}")
    return torch.stack(crops), labels


# --------------------------------------------------------------------------------------------
# On a sweep


@dataclass
class Examples:
    """Dataset examples of one target: top-k pool crops of a channel and its visualizations."""

    layer: str
    relu: str
    channel: int
    crops: np.ndarray  # (k, H, W, 3) in [0, 1]
    crop_acts: np.ndarray  # (k,)
    crop_labels: list[str]
    job_dirs: list[str]  # the channel's visualizations (ok jobs), at most k
    job_acts: list[float]


def _network_features(spec: Any) -> tuple[Features, int]:
    """Pixel image -> the job's target tensor (its layer, pre/post ReLU); and in_channels."""
    from featsweep.engine import load_network
    from featsweep.spec import model_info
    from featsweep.targets import LayerReader

    device = torch.device("cpu")
    model, layers = load_network(spec, device)
    info = model_info(spec.model)
    mean = torch.tensor(info.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(info.std, dtype=torch.float32).view(1, -1, 1, 1)
    target = (spec.target.layer, spec.target.relu)
    reader = LayerReader(model, [target], [i.name for i in layers])

    def features(x: torch.Tensor) -> torch.Tensor:
        return reader((x.float() - mean) / std)[target]

    return features, info.in_channels


def _spec_of(job_dir: str) -> Any:
    from omegaconf import OmegaConf

    from featsweep.spec import from_config

    cfg = OmegaConf.load(Path(job_dir) / ".hydra" / "config.yaml")
    return from_config(OmegaConf.to_container(cfg, resolve=True))


def add_quality(df: pd.DataFrame, *, natural_dir: str | Path | None = None,
                out_dir: str | Path | None = None, n_draws: int = N_DRAWS, seed: int = 0,
                top_k: int = TOP_K) -> tuple[pd.DataFrame, dict[tuple, Examples]]:
    """The table with :data:`QUALITY_COLUMNS` added, and the dataset examples per target.

    Only ``ok`` jobs with a channel objective and a finite ``image.npy`` get values (NaN
    otherwise, and for jobs whose config no longer validates). Jobs are grouped by model and
    image size, so each network and pool is built once.
    """
    from featsweep.analysis.columns import config_columns
    from featsweep.errors import UserError

    out = df.copy()
    for column in QUALITY_COLUMNS:
        out[column] = np.nan
    ok = out.index[out["status"].astype(str) == "ok"]
    specs: dict[int, Any] = {}
    for i in ok:
        try:
            spec = _spec_of(out.at[i, "job.dir"])
        except (UserError, OSError, ValueError):
            continue  # e.g. a config from an older featsweep: no quality values
        if getattr(spec.target, "kind", "channel") == "channel":
            specs[i] = spec
    groups: dict[tuple, list[int]] = {}
    for i, spec in specs.items():
        groups.setdefault((spec.model, spec.image.size, spec.target.layer, spec.target.relu), []).append(i)
    examples: dict[tuple, Examples] = {}
    pools: dict[int, tuple[torch.Tensor, list[str]]] = {}
    activations: dict[int, np.ndarray] = {}
    for (_, size, layer, relu), rows in groups.items():
        features, in_channels = _network_features(specs[rows[0]])
        images, keep = [], []
        for i in rows:
            try:
                pixels = np.load(Path(out.at[i, "job.dir"]) / "image.npy", allow_pickle=False)
            except (OSError, ValueError):
                continue
            if pixels.shape != (size, size, in_channels) or not np.isfinite(pixels).all():
                continue
            images.append(torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)).permute(2, 0, 1))
            keep.append(i)
        if not keep:
            continue
        batch = torch.stack(images)
        channels = [specs[i].target.channel for i in keep]
        robust = robustness(features, batch, channels, n_draws=n_draws, seed=seed)
        with torch.no_grad():
            feats = torch.cat([features(batch[s:s + 64]) for s in range(0, len(batch), 64)])
        for i, f in zip(keep, feats.double().numpy()):
            activations[i] = f
        out.loc[keep, "quality.robustness"] = robust
        if in_channels == 3:
            if size not in pools:
                pools[size] = natural_pool(size, natural_dir)
            pool, labels = pools[size]
            ratio, pool_acts = natural_ratio(features, batch, channels, pool)
            out.loc[keep, "quality.natural_ratio"] = ratio
            for channel, acts in pool_acts.items():
                top = np.argsort(-acts, kind="stable")[:top_k]
                mine = [i for i, c in zip(keep, channels) if c == channel][:top_k]
                examples[(layer, relu, channel)] = Examples(
                    layer=layer, relu=relu, channel=channel,
                    crops=pool[top].permute(0, 2, 3, 1).numpy(), crop_acts=acts[top],
                    crop_labels=[labels[t] for t in top],
                    job_dirs=[str(out.at[i, "job.dir"]) for i in mine],
                    job_acts=[float(out.at[i, "activation"]) for i in mine])
    # Seed diversity: settings are every config leaf but the seed.
    keys = [c for c in config_columns(out) if c != "seed"]
    if activations and "seed" in out.columns:
        have = out.loc[list(activations)]
        labels_of = pd.Series(["|".join(map(str, row)) for row in have[keys].itertuples(index=False)],
                              index=have.index)
        for _, members in labels_of.groupby(labels_of):
            rows = list(members.index)
            if len(rows) >= 2 and have.loc[rows, "seed"].nunique() == len(rows):
                out.loc[rows, "quality.seed_diversity"] = seed_diversity(
                    np.stack([activations[i] for i in rows]))
    if out_dir is not None and examples:
        _save_examples(examples, Path(out_dir))
    return out, examples


def _examples_name(key: tuple) -> str:
    layer, relu, channel = key
    return f"examples_{layer.replace('.', '_')}_{relu}_{channel}.png"


def _save_examples(examples: Mapping[tuple, Examples], out_dir: Path) -> None:
    from matplotlib.figure import Figure
    from PIL import Image

    from featsweep.analysis.figures import save_figure

    out_dir.mkdir(parents=True, exist_ok=True)
    for key, ex in examples.items():
        k = max(len(ex.crops), len(ex.job_dirs), 1)
        fig = Figure(figsize=(1.4 * k + 0.2, 3.4), dpi=100)
        for j in range(k):
            ax = fig.add_subplot(2, k, j + 1)
            ax.set_axis_off()
            if j < len(ex.crops):
                ax.imshow(np.clip(ex.crops[j], 0, 1))
                ax.set_title(f"{ex.crop_acts[j]:.3g}\n{ex.crop_labels[j]}", fontsize=6)
            ax = fig.add_subplot(2, k, k + j + 1)
            ax.set_axis_off()
            if j < len(ex.job_dirs):
                try:
                    with Image.open(Path(ex.job_dirs[j]) / "image.png") as im:
                        ax.imshow(np.asarray(im.convert("RGB")))
                except OSError:
                    pass
                ax.set_title(f"#{Path(ex.job_dirs[j]).name} act {ex.job_acts[j]:.3g}", fontsize=6)
        fig.suptitle(f"{ex.layer} ({ex.relu}-ReLU) channel {ex.channel}: top natural crops (top) "
                     f"and visualizations (bottom), with activations", fontsize=8)
        save_figure(fig, out_dir / _examples_name(key))


def examples_section(examples: Mapping[tuple, Examples]) -> list[str]:
    """Markdown lines of the report's dataset-examples section."""
    lines = ["## Dataset examples", "",
             "Per target channel: the natural crops of the pool that excite it most (top row, with "
             "their mean activation) beside its visualizations (bottom row). "
             "`quality.natural_ratio` = a visualization's activation ÷ the top crop's.", ""]
    for key in sorted(examples, key=lambda k: (k[0], k[1], k[2])):
        ex = examples[key]
        lines += [f"![{ex.layer} {ex.relu} channel {ex.channel}]({_examples_name(key)})", ""]
    return lines
