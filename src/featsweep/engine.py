"""The optimization loop: B images, each with its own hyperparameters, in one batch.

Tensors in, tensors and traces out: the engine never touches files or Hydra. A single run is a
batch of one; the batched launcher fills the batch with a sweep. Per step::

    x (B,3,H,W) -> [normalize] -> model, stopped at the deepest target -> per-image channel mean
    -> per-image SGD/Adam update -> clamp -> blur every `blur.every` steps -> next step

A run's outcome does not depend on its batch-mates: the init is seeded per image, every update
and blur is per image, and the model runs in eval mode. The only host syncs are every
`log_every` steps (progress line) and at the end.
"""

from __future__ import annotations

import ctypes
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from featsweep import __version__
from featsweep.blur import batch_kernels, blur_batch
from featsweep.errors import config_error
from featsweep.models import build_model
from featsweep.optim import BatchedOptimizer, batch_column
from featsweep.spec import MODELS, RunSpec
from featsweep.targets import (ChannelObjective, LayerReader, check_targets, has_pre_relu,
                               probe_layers)

log = logging.getLogger(__name__)


@dataclass
class JobOutcome:
    """What one image's optimization produced (arrays on the host)."""

    status: str  # "ok" | "diverged" | "interrupted"
    activation: float | None  # final channel mean (last finite value when diverged)
    activation_start: float | None  # channel mean of the starting image
    steps_done: int  # updates applied
    trace: np.ndarray  # (n, 2) float64: step, activation before that step's update (last: final)
    optimized: np.ndarray  # (H, W, 3) float32, the optimized tensor (image.space units)
    before_blur: np.ndarray  # (H, W, 3) float32, same units, before the last blur
    pixels: np.ndarray  # (H, W, 3) float32, pixel space, unstretched
    seconds: float  # wall time of the whole batch that computed this image
    device: str  # e.g. "cpu" or "cuda:0 (NVIDIA H100 80GB HBM3)"
    diverged_at: int | None = None  # step whose activation or gradient was not finite
    info: dict = field(default_factory=dict)  # resolved settings: layer, size, batch size, versions


def resolve_device(requested: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is a config error."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise config_error("device", "cuda", "no CUDA device is visible here (torch "
                           f"{torch.__version__}, cuda {torch.version.cuda}); use device=cpu or auto")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


_ALLOCATOR_TUNED = False


def tune_cpu_allocator() -> None:
    """Stop glibc from returning memory to the OS after every step.

    With stock settings each step's large activations are mmap'ed and unmapped again, and page
    faults eat a core: batching on the CPU becomes slower than B = 1 (see DESIGN.md, Speed).
    Same effect as MALLOC_MMAP_THRESHOLD_=32 MiB, MALLOC_TRIM_THRESHOLD_=16 GiB, MALLOC_TOP_PAD_=1 GiB
    and MALLOC_MMAP_MAX_=0.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_top_pad, m_mmap_threshold, m_mmap_max = -1, -2, -3, -4
        libc.mallopt(m_mmap_threshold, 32 * 2**20)
        # 32 MiB is glibc's largest mmap threshold, and a batch of 64 images at 224 px is bigger:
        # no mmap at all, or those tensors fault in their pages again every step.
        libc.mallopt(m_mmap_max, 0)
        libc.mallopt(m_trim_threshold, 16 * 2**30)
        libc.mallopt(m_top_pad, 2**30)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass
    _ALLOCATOR_TUNED = True


_MODELS: dict[tuple, tuple[nn.Module, list]] = {}


def load_network(spec: RunSpec, device: torch.device) -> tuple[nn.Module, list]:
    """The frozen model on `device` and its probed layers; cached for the life of the process
    (a sweep pays model start-up once)."""
    key = (spec.model.name, spec.model.weights, str(device))
    if key not in _MODELS:
        model = build_model(spec.model).to(device)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        size = max(MODELS[spec.model.name].min_size, 64)
        _MODELS.clear()  # one network at a time: a sweep is grouped by model
        _MODELS[key] = (model, probe_layers(model, size, device))
    return _MODELS[key]


def validate(specs: Sequence[RunSpec]) -> None:
    """Every check that needs the model, before any optimization: raises ConfigError."""
    for spec in specs:
        device = resolve_device(spec.device)
        if spec.precision == "bf16" and device.type != "cuda":
            raise config_error("precision", "bf16", f"bf16 autocast runs on CUDA only and this "
                               f"job runs on {device.type}; use precision=fp32")
        model, layers = load_network(spec, device)
        check_targets(model, layers, [(spec.target.layer, spec.target.relu, spec.target.channel)],
                      spec.model.name)
        if spec.target.relu == "pre":
            _check_pre_relu(spec, model, layers, device)


_PRE_OK: set[tuple] = set()


def _check_pre_relu(spec: RunSpec, model: nn.Module, layers: list, device: torch.device) -> None:
    """A pre-ReLU target exists only where the layer ends in a ReLU: one truncated forward at the
    probe size finds out (ConfigError otherwise), once per model and layer."""
    key = (spec.model.name, spec.model.weights, str(device), spec.target.layer)
    if key in _PRE_OK:
        return
    size = max(MODELS[spec.model.name].min_size, 64)
    if not has_pre_relu(model, [i.name for i in layers], spec.target.layer, size, device):
        raise config_error(
            "target.relu", "pre", f"the output of layer {spec.target.layer} is not produced by a "
            "ReLU (nor a concatenation of ReLU outputs), so it has no pre-ReLU form; use "
            "target.relu=post, or target a layer that ends in a ReLU (python -m featsweep.layers "
            f"model={spec.model.name} marks them)")
    _PRE_OK.add(key)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def _start_images(specs: Sequence[RunSpec]) -> torch.Tensor:
    """Uniform noise in pixel space, (B, 3, H, W), seeded per image on the CPU (device-independent)."""
    out = []
    for spec in specs:
        g = torch.Generator().manual_seed(spec.seed)
        out.append(torch.rand(3, spec.image.size, spec.image.size, generator=g))
    return torch.stack(out)


def _hwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().permute(1, 2, 0).cpu().numpy().astype(np.float32)


class _Progress:
    """A progress line every `log_every` steps: bar, activation, speed and ETA."""

    def __init__(self, total: int, batch: int, label: str, emit: Callable[[str], None]) -> None:
        self.total, self.batch, self.label, self.emit = total, batch, label, emit
        self.t0 = time.perf_counter()

    def __call__(self, step: int, act: list[float], alive: int) -> None:
        elapsed = time.perf_counter() - self.t0
        finite = [a for a in act if math.isfinite(a)]
        per = elapsed / max(step, 1)
        eta = per * (self.total - step)
        bar = "#" * int(20 * step / self.total)
        acts = (f"act mean {np.mean(finite):.3g} min {min(finite):.3g} max {max(finite):.3g}"
                if finite else "act n/a")
        self.emit(f"{self.label} step {step}/{self.total} [{bar:<20}] {acts} | {alive}/{self.batch} "
                  f"running | {1000 * per / self.batch:.2f} ms/image-step | ETA {eta:.0f}s")


def run_batch(specs: Sequence[RunSpec], *, emit: Callable[[str], None] | None = None,
              should_stop: Callable[[], bool] | None = None) -> list[JobOutcome]:
    """Optimize one image per spec, all in one batch; return one JobOutcome per spec, in order.

    All specs must share ``batch_key()`` (model, weights, image size and space, device,
    precision). `should_stop` is polled every step (a Python flag, no sync): when it turns true
    the running images end with status "interrupted" and their current state.
    """
    if not specs:
        return []
    keys = {s.batch_key() for s in specs}
    if len(keys) != 1:
        raise ValueError(f"run_batch needs specs that share a batch key, got {sorted(map(str, keys))}")
    emit = emit or log.info
    first = specs[0]
    device = resolve_device(first.device)
    if device.type == "cpu":
        tune_cpu_allocator()
    else:
        torch.backends.cudnn.benchmark = True
    validate(specs)
    model, layers = load_network(first, device)
    batch = len(specs)
    t_start = time.perf_counter()

    info = MODELS[first.model.name]
    mean = torch.tensor(info.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(info.std, device=device).view(1, 3, 1, 1)
    normalized = first.image.space == "normalized"

    def to_model_input(x: torch.Tensor) -> torch.Tensor:
        return x if normalized else (x - mean) / std

    targets = [(s.target.layer, s.target.relu) for s in specs]
    reader = LayerReader(model, targets, [i.name for i in layers])
    objective = ChannelObjective(targets, [s.target.channel for s in specs], device)

    pixels0 = _start_images(specs).to(device)
    param = (pixels0 - mean) / std if normalized else pixels0
    if device.type == "cuda":
        param = param.contiguous(memory_format=torch.channels_last)
    opt = BatchedOptimizer.create([s.optimizer for s in specs], param)

    def col(values: Sequence[float]) -> torch.Tensor:
        return batch_column(values, device)

    # Clamp bounds per image, in each image's clamp space (±inf where clamping is off).
    lo = col([s.regularizer.clamp_range[0] if s.regularizer.clamp else -math.inf for s in specs])
    hi = col([s.regularizer.clamp_range[1] if s.regularizer.clamp else math.inf for s in specs])
    other_space = [s.regularizer.clamp and s.regularizer.clamp_space != s.image.space for s in specs]
    cross = col(other_space).bool() if any(other_space) else None

    def clamp(x: torch.Tensor) -> torch.Tensor:
        if cross is None:
            return torch.maximum(torch.minimum(x, hi), lo)
        # Clamp in the other space: map there, clamp, map back (normalization is affine).
        there = x * std + mean if normalized else (x - mean) / std
        there = torch.maximum(torch.minimum(there, hi), lo)
        back = (there - mean) / std if normalized else there * std + mean
        return torch.where(cross, back, torch.maximum(torch.minimum(x, hi), lo))

    blurs = [s.blur.kind != "none" and s.blur.k > 1 for s in specs]
    kernels = batch_kernels([s.blur for s in specs]).to(device) if any(blurs) else None
    blur_every = torch.tensor([s.blur.every for s in specs], device=device)
    blur_on = col(blurs).bool()
    steps = torch.tensor([s.steps for s in specs], device=device)
    max_steps = max(s.steps for s in specs)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16,
                              enabled=first.precision == "bf16" and device.type == "cuda")

    trace = torch.full((max_steps + 1, batch), math.nan, device=device)
    alive = torch.ones(batch, dtype=torch.bool, device=device)
    diverged_at = torch.full((batch,), -1, dtype=torch.long, device=device)
    before_blur = param.detach().clone()
    log_every = min(s.log_every for s in specs)
    label = (f"[{first.model.name} {first.image.size}px {device.type} batch of {batch}]")
    progress = _Progress(max_steps, batch, label, emit)
    emit(f"{label} optimizing {batch} image(s) for {max_steps} steps "
         f"({len({t for t in targets})} target(s), deepest layer {reader.deepest})")

    done = 0
    for t in range(max_steps):
        if should_stop is not None and should_stop():
            break
        x = param.detach().requires_grad_(True)
        with autocast:
            act = objective(reader(to_model_input(x)))
        (grad,) = torch.autograd.grad(-act.sum(), x)
        with torch.no_grad():
            trace[t] = act.detach()
            finite = torch.isfinite(act) & torch.isfinite(grad).flatten(1).all(dim=1)
            running = alive & (t < steps)
            newly_bad = running & ~finite
            diverged_at = torch.where(newly_bad, torch.full_like(diverged_at, t), diverged_at)
            alive = alive & ~newly_bad
            active = (running & finite).view(-1, 1, 1, 1)
            opt.step(param, torch.nan_to_num(grad), active)
            param.copy_(torch.where(active, clamp(param), param))
            if kernels is not None:
                due = active & blur_on & ((t + 1) % blur_every == 0).view(-1, 1, 1, 1)
                before_blur = torch.where(due, param, before_blur)
                param.copy_(torch.where(due, blur_batch(param, kernels), param))
        done = t + 1
        if done % log_every == 0 or done == max_steps:
            progress(done, trace[t].tolist(), int(alive.sum()))

    with torch.no_grad(), autocast:
        final = objective(reader(to_model_input(param)))
    seconds = time.perf_counter() - t_start
    trace_np = trace.cpu().numpy().astype(np.float64)
    final_np = final.float().cpu().numpy().astype(np.float64)
    diverged_np = diverged_at.cpu().numpy()
    pixels = param * std + mean if normalized else param
    before_blur = torch.where(blur_on, before_blur, param) if kernels is not None else param

    outcomes = []
    for i, spec in enumerate(specs):
        n = min(spec.steps, done)
        acts = np.append(trace_np[:n, i], final_np[i])
        bad = int(diverged_np[i]) if diverged_np[i] >= 0 else None
        if bad is None and not np.isfinite(final_np[i]):
            bad = n  # the last update overflowed: the final image is not finite
        if bad is not None:
            n = bad
            acts = acts[: bad + 1]
        finite_acts = acts[np.isfinite(acts)]
        status = "diverged" if bad is not None else ("interrupted" if n < spec.steps else "ok")
        outcomes.append(JobOutcome(
            status=status,
            activation=float(finite_acts[-1]) if finite_acts.size else None,
            activation_start=float(acts[0]) if np.isfinite(acts[0]) else None,
            steps_done=n,
            trace=np.column_stack([np.arange(acts.size, dtype=np.float64), acts]),
            optimized=_hwc(param[i]),
            before_blur=_hwc(before_blur[i]),
            pixels=_hwc(pixels[i]),
            seconds=seconds,
            device=_device_name(device),
            diverged_at=bad,
            info={"layer": spec.target.layer, "image_size": spec.image.size, "batch_size": batch},
        ))
    return outcomes
