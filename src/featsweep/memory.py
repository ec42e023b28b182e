"""Pre-flight memory check: will a batch fit, before anything is allocated for it?

A batch's peak memory is estimated from three parts:

- activations: the truncated forward (input -> deepest target) and what autograd saves for the
  input gradient, *measured* once per network and target at the probe size (the engine's model
  and its probe size, one image) by counting the bytes of the tensors autograd saves, then scaled
  by the image area (a CNN's activations grow with H x W) and by the batch size, plus the
  largest single activation twice (its gradient, and the next one being built);
- per image: the optimized tensor, its gradient, the optimizer's moments, the clamped, blurred
  and before-blur copies and the normalized model input: ``_IMAGE_COPIES`` float32 images;
- the trace: the engine's trace buffer (rows x batch x float32; the engine bounds its rows, see
  ``featsweep.engine``), its float64 host copy and the per-job arrays.

Available memory: on the CPU the host's ``MemAvailable`` (or the cgroup limit a container or
SLURM sets, whichever is lower); on CUDA ``torch.cuda.mem_get_info`` plus what PyTorch's caching
allocator holds but does not use. ``FEATSWEEP_MEMORY_BUDGET_MB`` replaces it (tests, or to leave
room on a shared machine). Only ``_SAFETY`` of it is planned for: the estimate is an estimate.

Nothing here allocates in proportion to the image size or to ``steps``: the measurement runs at
the probe size, and the rest is arithmetic.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from featsweep.errors import config_error

if TYPE_CHECKING:
    import torch

    from featsweep.spec import RunSpec

BUDGET_ENV = "FEATSWEEP_MEMORY_BUDGET_MB"
_IMAGE_COPIES = 12  # float32 (C, H, W) images held per job during a step (see module docstring)
_SAFETY = 0.85  # plan for at most this fraction of what is available
_ACT_CACHE: dict[tuple, tuple[int, int, int]] = {}


@dataclass(frozen=True)
class Estimate:
    """Bytes one batch needs at its peak, by part."""

    activations: int
    images: int
    trace: int

    @property
    def total(self) -> int:
        return self.activations + self.images + self.trace


def _gib(n: float) -> str:
    for unit, size in (("TB", 2**40), ("GB", 2**30), ("MB", 2**20)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n / 2**10:.3g} KB"


def _mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_room() -> int | None:
    """Room left under a cgroup memory limit (v2, then v1), or None when unlimited."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or not limit.isdigit() or int(limit) >= 2**60:
            return None
        return max(0, int(limit) - usage)
    return None


def available(device: "torch.device") -> tuple[int, str]:
    """(bytes available for a batch on `device`, where that figure comes from)."""
    budget = os.environ.get(BUDGET_ENV)
    if budget:
        try:
            return int(float(budget) * 2**20), f"{BUDGET_ENV}={budget}"
        except ValueError:
            raise config_error(BUDGET_ENV, budget, "must be a number of MB") from None
    if device.type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return free + cached, f"free memory of {device}"
    host = _mem_available()
    room = _cgroup_room()
    values = [v for v in (host, room) if v is not None]
    if not values:
        return 2**62, "unknown (not checked)"
    return min(values), "host memory available" if room is None or (host or 0) <= room \
        else "the cgroup's memory limit"


def _measure(spec: "RunSpec", device: "torch.device") -> tuple[int, int, int]:
    """(bytes autograd saves, bytes of the largest activation, probe size) for one image at the
    probe size: a truncated forward to the target with the input gradient's graph."""
    import torch

    from featsweep import engine
    from featsweep.targets import LayerReader, check_targets

    model, layers = engine.load_network(spec, device)
    # An unknown layer or channel gets its own message (before anything is measured).
    check_targets(model, layers, [(spec.target.layer, spec.target.relu, spec.target.channel)],
                  spec.model.name)
    probe = engine._probe_size(spec) if hasattr(engine, "_probe_size") else 64
    key = (spec.model, str(device), spec.target.layer, spec.target.relu, probe)
    if key in _ACT_CACHE:
        return _ACT_CACHE[key]
    try:
        from featsweep.models import model_info

        channels = int(model_info(spec.model).in_channels)
    except (ImportError, AttributeError):
        channels = 3
    saved: dict[int, int] = {}
    largest = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            storage = t.untyped_storage()
            saved[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, NotImplementedError):  # a tensor without storage (a view of one)
            saved[id(t)] = t.numel() * t.element_size()
        largest[0] = max(largest[0], t.numel() * t.element_size())
        return t

    reader = LayerReader(model, [(spec.target.layer, spec.target.relu)], [i.name for i in layers])
    x = torch.zeros(1, channels, probe, probe, device=device, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        feats = reader(x)
    for value in feats.values():
        largest[0] = max(largest[0], value.numel() * value.element_size())
    del feats, x
    _ACT_CACHE[key] = (sum(saved.values()), largest[0], probe)
    return _ACT_CACHE[key]


def _trace_rows(steps: int) -> int:
    from featsweep import engine

    stride = engine._trace_stride(steps) if hasattr(engine, "_trace_stride") else 1
    return steps // stride + 2


def estimate(specs: Sequence["RunSpec"], device: "torch.device | None" = None) -> Estimate:
    """The peak bytes of running `specs` as one batch (they share a batch key)."""
    from featsweep.engine import resolve_device

    first = specs[0]
    device = resolve_device(first.device) if device is None else device
    size = first.image.size
    acts = 0.0
    for spec in specs:
        saved, largest, probe = _measure(spec, device)
        scale = (spec.transform.model_size(size) / probe) ** 2  # the model sees pad and crops
        acts += (saved + 2 * largest) * scale
    try:
        from featsweep.models import model_info

        channels = int(model_info(first.model).in_channels)
    except (ImportError, AttributeError):
        channels = 3
    images = len(specs) * _IMAGE_COPIES * channels * size * size * 4
    rows = _trace_rows(max(s.steps for s in specs))
    trace = rows * len(specs) * (4 + 8 + 8)  # the buffer, its float64 copy, the per-job arrays
    return Estimate(int(acts), int(images), int(trace))


def _room(specs: Sequence["RunSpec"]) -> tuple[int, str, "torch.device"]:
    from featsweep.engine import resolve_device

    device = resolve_device(specs[0].device)
    avail, source = available(device)
    return int(avail * _SAFETY), source, device


def check_batch(specs: Sequence["RunSpec"]) -> None:
    """Raise a ConfigError (naming image.size, or steps when the trace is the problem) when ONE
    image of `specs` cannot fit; before anything of the run is allocated."""
    if not specs:
        return
    room, source, device = _room(specs)
    for spec in specs:
        est = estimate([spec], device)
        if est.total <= room:
            continue
        where = f"{_gib(room / _SAFETY)} available ({source}; {int(_SAFETY * 100)}% is planned for)"
        if est.trace > est.activations + est.images:
            raise config_error(
                "steps", spec.steps, f"recording {spec.steps} steps needs an estimated "
                f"{_gib(est.trace)} for the activation trace alone and {where}; use fewer steps")
        per_pixel = (est.activations + est.images) / spec.image.size ** 2
        fits = int(math.sqrt(max(0, room - est.trace) / per_pixel)) if per_pixel > 0 else 0
        raise config_error(
            "image.size", spec.image.size,
            f"one {spec.image.size} x {spec.image.size} px image needs an estimated "
            f"{_gib(est.total)} (activations up to {spec.target.layer}: {_gib(est.activations)}, "
            f"image and optimizer state: {_gib(est.images)}) and {where}; use a smaller "
            f"image.size (about {fits} px fits here)")


def max_fitting(specs: Sequence["RunSpec"]) -> int:
    """How many of `specs` (one batch, in order) fit together: len(specs) when all do, else the
    largest n whose first n images fit (at least 1: one image was checked by check_batch)."""
    if not specs:
        return 0
    check_batch(specs)
    room, _, device = _room(specs)
    if estimate(specs, device).total <= room:
        return len(specs)
    lo, hi = 1, len(specs)  # the estimate grows with n: bisect the largest n that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if estimate(specs[:mid], device).total <= room:
            lo = mid
        else:
            hi = mid - 1
    return lo
