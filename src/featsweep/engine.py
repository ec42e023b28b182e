"""The optimization loop: B images, each with its own settings, in one batch.

Tensors in, tensors and traces out: the engine never touches files or Hydra. A single run is a
batch of one; the batched launcher fills the batch with a sweep. The loop knows only the
components' contracts (docs/CONTRACTS.md), built once per batch from the RunSpecs::

    params (featsweep.param)          -> image (B, C, H, W) in pixel space
    [blur, blur.mode=transform]       -> transforms (featsweep.transforms; per image, seeded)
    -> normalize -> model, stopped at the deepest target (featsweep.targets.LayerReader)
       [redirected ReLU gradients, featsweep.redirect]
    -> objective per image (featsweep.objectives) - penalties (featsweep.penalties) - diversity
    -> per-image SGD/Adam update of the params (featsweep.optim)
    -> clamp -> blur every `blur.every` steps (blur.mode=project, the notes) -> next step

A run's outcome does not depend on its batch-mates: the start and the transform draws are
seeded per image, every update, clamp and blur is per image, and the model runs in eval mode
(diversity, by design, couples the images of one diversity group). Images that the model sees at
different sizes (``transform.pad`` and the jitter crops) go through one forward per size. The only host syncs are every
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

from featsweep.blur import batch_kernels, blur_batch
from featsweep.errors import config_error
from featsweep.models import build_model
from featsweep.objectives import Objectives, direction_vector, diversity_terms, gram
from featsweep.optim import BatchedOptimizer, batch_column
from featsweep.param import ImageParams, ParamGroup
from featsweep.penalties import Penalties
from featsweep.redirect import redirecting
from featsweep.spec import RunSpec, check_batch_groups, model_info
from featsweep.targets import LayerReader, check_targets, has_pre_relu, probe_layers
from featsweep.transforms import RandomTransforms

log = logging.getLogger(__name__)

TRACE_MAX = 100_000  # trace rows kept per image; longer runs record every ceil(steps / TRACE_MAX)
STATE_VERSION = 1  # layout of JobOutcome.state


@dataclass
class JobOutcome:
    """What one image's optimization produced (arrays on the host)."""

    status: str  # "ok" | "diverged" | "interrupted"
    activation: float | None  # final objective value (last finite value when diverged)
    activation_start: float | None  # objective of the starting image
    steps_done: int  # updates applied
    trace: np.ndarray  # (n, 2) float64: step, objective before that step's update (last: final)
    optimized: np.ndarray  # (H, W, C) float32: the optimized tensor (image.space units) for
    # param=pixel without decorrelate/squash, else the pixel image
    before_blur: np.ndarray  # (H, W, C) float32, same units, before the last blur
    pixels: np.ndarray  # (H, W, C) float32, pixel space, unstretched
    seconds: float  # wall time of the whole batch that computed this image
    device: str  # e.g. "cpu" or "cuda:0 (NVIDIA H100 80GB HBM3)"
    diverged_at: int | None = None  # step whose objective or gradient was not finite
    info: dict = field(default_factory=dict)  # resolved settings: layer, size, batch size, ...
    state: dict | None = None  # "interrupted": what run_batch(states=...) needs to continue


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
    faults eat a core: batching on the CPU becomes slower than B = 1 (measured: BENCHMARKS.md).
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


def _probe_size(spec: RunSpec) -> int:
    # A size the network is known to run at: its fixed size, else 64 px within [min, default].
    info = model_info(spec.model)
    return info.max_size or min(max(info.min_size, 64), info.default_size)


def load_network(spec: RunSpec, device: torch.device) -> tuple[nn.Module, list]:
    """The frozen model on `device` and its probed layers; cached for the life of the process
    (a sweep pays model start-up once)."""
    key = (spec.model.identity(), str(device))
    if key not in _MODELS:
        model = build_model(spec.model).to(device)
        _MODELS.clear()  # one network at a time: a sweep is grouped by model
        _MODELS[key] = (model, probe_layers(model, _probe_size(spec), device,
                                            in_channels=model_info(spec.model).in_channels))
    return _MODELS[key]


def validate(specs: Sequence[RunSpec], *, groups: bool = True) -> None:
    """Every check that needs the model, before any optimization: raises ConfigError.
    `groups`: also the rules across `specs` (a diversity group needs its jobs together); a
    launcher checking job by job checks those once over the whole sweep instead."""
    if groups:
        check_batch_groups(specs)
    for spec in specs:
        device = resolve_device(spec.device)
        if spec.precision == "bf16" and device.type != "cuda":
            raise config_error("precision", "bf16", f"bf16 autocast runs on CUDA only and this "
                               f"job runs on {device.type}; use precision=fp32")
        info = model_info(spec.model)
        if spec.param.decorrelate and info.in_channels != 3:
            raise config_error("param.decorrelate", True, f"colour decorrelation needs RGB input "
                               f"and this model takes {info.in_channels} channel(s); use "
                               "param.decorrelate=false")
        model, layers = load_network(spec, device)
        check_targets(model, layers, [(spec.target.layer, spec.target.relu, spec.target.channel)],
                      spec.model.cli)
        if spec.target.relu == "pre":
            _check_pre_relu(spec, model, layers, device)
        if spec.target.kind == "neuron" and (spec.target.x is not None or spec.target.y is not None):
            _check_neuron(spec, model, layers, device)
        if spec.target.kind == "direction":
            channels = next(i.shape[0] for i in layers if i.name == spec.target.layer)
            direction_vector(spec, channels)


_PRE_OK: set[tuple] = set()


def _check_pre_relu(spec: RunSpec, model: nn.Module, layers: list, device: torch.device) -> None:
    """A pre-ReLU target exists only where the layer ends in a ReLU: one truncated forward at the
    probe size finds out (ConfigError otherwise), once per model and layer."""
    key = (spec.model.identity(), str(device), spec.target.layer)
    if key in _PRE_OK:
        return
    channels = model_info(spec.model).in_channels
    if not has_pre_relu(model, [i.name for i in layers], spec.target.layer, _probe_size(spec),
                        device, in_channels=channels):
        raise config_error(
            "target.relu", "pre", f"the output of layer {spec.target.layer} is not produced by a "
            "ReLU (nor a concatenation of ReLU outputs), so it has no pre-ReLU form; use "
            "target.relu=post, or target a layer that ends in a ReLU (python -m featsweep.layers "
            f"model={spec.model.cli} marks them)")
    _PRE_OK.add(key)


_LAYER_SIZES: dict[tuple, tuple[int, ...]] = {}


def layer_shape(spec: RunSpec, model: nn.Module, layers: list, device: torch.device,
                size: int | None = None) -> tuple[int, ...]:
    """(C, h, w) of the target layer's output for a model input of `size` (default image.size):
    one truncated forward of a zero image, cached per model, size and layer."""
    size = spec.image.size if size is None else size
    key = (spec.model.identity(), str(device), size, spec.target.layer, spec.target.relu)
    if key not in _LAYER_SIZES:
        channels = model_info(spec.model).in_channels
        reader = LayerReader(model, [(spec.target.layer, spec.target.relu)], [i.name for i in layers])
        with torch.no_grad():
            out = reader(torch.zeros(1, channels, size, size, device=device))
        _LAYER_SIZES[key] = tuple(next(iter(out.values())).shape[1:])
    return _LAYER_SIZES[key]


def _check_neuron(spec: RunSpec, model: nn.Module, layers: list, device: torch.device) -> None:
    seen = spec.transform.model_size(spec.image.size)
    _, h, w = layer_shape(spec, model, layers, device, seen)
    token = getattr(spec.target, "token", None)
    if token is not None and not 0 <= token < w:  # a token layer, read as (C, 1, N)
        raise config_error("target.token", token, f"layer {spec.target.layer} has {w} tokens at "
                           f"image.size={spec.image.size}, so it must be in 0..{w - 1}")
    for key, value, limit in (("target.x", spec.target.x, w), ("target.y", spec.target.y, h)):
        if value is not None and not 0 <= value < limit:
            raise config_error(key, value, f"layer {spec.target.layer} is {h}×{w} (rows × "
                               f"columns) at image.size={spec.image.size}"
                               f"{f' (the model sees {seen} px after transform.pad and the jitter crops)' if seen != spec.image.size else ''}, so it "
                               f"must be in 0..{limit - 1} (null = the centre)")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def _hwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().permute(1, 2, 0).cpu().numpy().astype(np.float32)


class _Progress:
    """A progress line every `log_every` steps: bar, activation, speed and ETA."""

    def __init__(self, total: int, batch: int, label: str, emit: Callable[[str], None],
                 begin: int = 0) -> None:
        self.total, self.batch, self.label, self.emit, self.begin = total, batch, label, emit, begin
        self.t0 = time.perf_counter()

    def __call__(self, step: int, act: list[float], alive: int) -> None:
        elapsed = time.perf_counter() - self.t0
        finite = [a for a in act if math.isfinite(a)]
        per = elapsed / max(step - self.begin, 1)
        eta = per * (self.total - step)
        bar = "#" * int(20 * step / self.total)
        acts = (f"act mean {np.mean(finite):.3g} min {min(finite):.3g} max {max(finite):.3g}"
                if finite else "act n/a")
        self.emit(f"{self.label} step {step}/{self.total} [{bar:<20}] {acts} | {alive}/{self.batch} "
                  f"running | {1000 * per / self.batch:.2f} ms/image-step | ETA {eta:.0f}s")


class _Clamp:
    """Per-image clamp bounds for the images of one parameter group, in each image's clamp space
    (±inf where clamping is off). `x` is in the group's units: image.space units for plain pixel
    groups, pixel space otherwise."""

    def __init__(self, specs: Sequence[RunSpec], rows: Sequence[int], normalized: bool,
                 skip: Sequence[bool], mean: torch.Tensor, std: torch.Tensor,
                 device: torch.device, ndim: int = 4) -> None:
        members = [specs[i] for i in rows]
        on = [s.regularizer.clamp and not k for s, k in zip(members, skip)]
        self.any = any(on)
        self.lo = batch_column([s.regularizer.clamp_range[0] if c else -math.inf
                                for s, c in zip(members, on)], device)
        self.hi = batch_column([s.regularizer.clamp_range[1] if c else math.inf
                                for s, c in zip(members, on)], device)
        space = "normalized" if normalized else "pixel"
        other = [c and s.regularizer.clamp_space != space for s, c in zip(members, on)]
        self.cross = batch_column(other, device).bool() if any(other) else None
        self.normalized, self.mean, self.std = normalized, mean, std

    def __call__(self, x: torch.Tensor, active: torch.Tensor | None = None,
                 in_place: bool = False) -> torch.Tensor:
        """`x` clamped, only the `active` images ((B, 1, 1, 1) bool) when given; `in_place`
        writes into `x`. In the image's own space the mask goes into the bounds (an inactive
        image's are ±inf), so the clamp is one pass over the pixels, not a clamp and a select."""
        lo, hi = self.lo, self.hi
        if active is not None:
            lo, hi = torch.where(active, lo, -math.inf), torch.where(active, hi, math.inf)
        if self.cross is None:
            return x.clamp_(lo, hi) if in_place else x.clamp(lo, hi)
        own = x.clamp(lo, hi)
        # Clamp in the other space: map there, clamp, map back (normalization is affine).
        there = x * self.std + self.mean if self.normalized else (x - self.mean) / self.std
        there = there.clamp(lo, hi)
        back = (there - self.mean) / self.std if self.normalized else there * self.std + self.mean
        out = torch.where(self.cross, back, own)
        if active is not None:  # mapped there and back, an unclamped pixel may round differently
            out = torch.where(active, out, x)
        return x.copy_(out) if in_place else out


def memory_format(spec: RunSpec, device: torch.device) -> torch.memory_format:
    """The layout of a batch's images and the network's convolution weights.

    ``auto`` is channels-last on both devices, a measured rule: on the project's 2-core CPU,
    EfficientNet-Lite0's truncated fwd + input gradient is 1.23x (B=1) to 1.78x (B=64) faster in
    channels-last, Inception v3 1.13x, and the tiny test network within ±15 % either way
    (docs/CONTRACTS.md; benchmarks/bench_speed.py reports both floors); on CUDA it is what cuDNN's
    fastest kernels want. Layouts round differently, so a job's image depends on it (to ~1e-6
    over a few steps); result.json records it.
    """
    if spec.engine.memory_format == "contiguous":
        return torch.contiguous_format
    return torch.channels_last


def make_reader(model: nn.Module, targets: Sequence[tuple[str, str]], order: Sequence[str],
                spec: RunSpec, size: int, device: torch.device, fuse_relu: bool = False
                ) -> nn.Module | LayerReader:
    """The truncated forward for `targets`: an FX graph cut (featsweep.graph; no exception, no
    TorchFunctionMode, so it compiles as one graph) where the network traces and agrees with the
    hook reader on a probe image; the hook reader (targets.LayerReader) otherwise. With
    ``engine.fuse_conv`` the graph's eval-mode BatchNorms and zero paddings are folded into the
    convolutions next to them (fewer passes over the activations, forward and backward; the same
    values to rounding, checked on the probe), and with `fuse_relu` on the CPU each convolution
    and its ReLU are one node (featsweep.graph._ConvClamp)."""
    if spec.engine.truncate == "auto":
        from featsweep.graph import graph_reader

        g = torch.Generator().manual_seed(0)
        probe = torch.rand(1, model_info(spec.model).in_channels, size, size, generator=g)
        reader = graph_reader(model, targets, order, probe.to(device), fuse_conv=spec.engine.fuse_conv,
                              fuse_relu=fuse_relu)
        if reader is not None:
            return reader
    return LayerReader(model, targets, order)


@dataclass
class _LoopState:
    """What a step changes besides the parameters and optimizer state."""

    alive: torch.Tensor  # (B,) bool: not diverged
    diverged_at: torch.Tensor  # (B,) long: step of divergence, -1 = none
    before_blur: list  # per parameter group, the images before their last blur
    redirect: bool = False  # this step, some image uses the redirected ReLU gradient


def compiled_step(step: Callable, spec: RunSpec, device: torch.device,
                  forwards: list) -> Callable:
    """`step` itself, or with ``engine.compile`` ``torch.compile(step, fullgraph=True)`` (the
    autograd call traced into the graph), or with ``engine.cuda_graphs`` on CUDA the compiled
    step in inductor's CUDA-graph mode ("reduce-overhead": capture once, replay)."""
    if not (spec.engine.compile or spec.engine.cuda_graphs):
        return step
    if spec.engine.cuda_graphs and device.type != "cuda":
        raise config_error("engine.cuda_graphs", True, "CUDA graphs need a CUDA device and this "
                           f"job runs on {device.type}; use engine.cuda_graphs=false")
    if any(isinstance(f[1], LayerReader) for f in forwards):
        raise config_error("engine.compile", True, f"{spec.model.name} could not be cut as an FX "
                           "graph at the target (it does not trace), so its forward stops with "
                           "an exception that torch.compile cannot capture; use engine.compile=false")
    if spec.target.relu_gradient == "redirect":
        raise config_error("engine.compile", True, "the redirected ReLU gradient runs as a "
                           "TorchFunctionMode, which a fullgraph compile does not capture; use "
                           "engine.compile=false with target.relu_gradient=redirect")
    import torch._dynamo

    mode = "reduce-overhead" if spec.engine.cuda_graphs else None
    compiled = torch.compile(step, fullgraph=True, mode=mode, dynamic=False)

    def run(t: torch.Tensor, draws: list) -> torch.Tensor:
        with torch._dynamo.config.patch(trace_autograd_ops=True):
            return compiled(t, draws)

    return run


def _trace_stride(max_steps: int) -> int:
    return max(1, -(-max_steps // TRACE_MAX))


def run_batch(specs: Sequence[RunSpec], *, emit: Callable[[str], None] | None = None,
              should_stop: Callable[[], bool] | None = None,
              states: Sequence[dict | None] | None = None) -> list[JobOutcome]:
    """Optimize one image per spec, all in one batch; return one JobOutcome per spec, in order.

    All specs must share ``batch_key()`` (model, weights, image size, device, precision).
    `should_stop` is polled every step (a Python flag, no sync): when it turns true the running
    images end with status "interrupted", their current image and a ``state``. `states` (one per
    spec, or None) continues such images from their saved state: with the same batch
    composition the final image equals an uninterrupted run's.
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
    info = model_info(first.model)
    order = [i.name for i in layers]

    def col(values: Sequence[float]) -> torch.Tensor:
        return batch_column(values, device)

    # --- components, built once per batch ------------------------------------------------------
    layout = memory_format(first, device)
    model.to(memory_format=layout)
    params = ImageParams(specs, info.in_channels, info.mean, info.std, device, layout)
    mean, std = params.mean, params.std
    opts = [BatchedOptimizer.create([specs[i].optimizer for i in g.rows_list], g.tensor)
            for g in params.groups]
    transforms = RandomTransforms(specs, device)
    penalties = Penalties(specs, device)
    blurs = [s.blur.active for s in specs]
    kernels = batch_kernels([s.blur for s in specs]).to(device) if any(blurs) else None
    project_blur = [b and s.blur.mode == "project" for b, s in zip(blurs, specs)]
    forward_blur = [b and s.blur.mode == "transform" for b, s in zip(blurs, specs)]
    forward_blur_on = col(forward_blur).bool() if any(forward_blur) else None
    through_pixels = [s.transform.active or fb for s, fb in zip(specs, forward_blur)]
    directions = {}
    for i, s in enumerate(specs):
        if s.target.kind == "direction":
            channels = next(li.shape[0] for li in layers if li.name == s.target.layer)
            directions[i] = direction_vector(s, channels)
    # Convolution + ReLU as one node (featsweep.graph._ConvClamp) only where nothing needs to see
    # the ReLU on its own: the redirected gradient replaces each ReLU call, and a compiled step
    # leaves fusion to inductor.
    fuse_relu = not (first.engine.compile or first.engine.cuda_graphs
                     or any(s.target.relu_gradient == "redirect" for s in specs))
    forwards = []  # per size group: (group, reader, objectives, through-pixels mask or None)
    for sg in transforms.groups:
        targets = [(specs[i].target.layer, specs[i].target.relu) for i in sg.rows]
        through = [through_pixels[i] for i in sg.rows]
        mask = None
        if any(through) and not all(through):
            mask = torch.tensor(through, device=device).view(-1, 1, 1, 1)
        reader = make_reader(model, targets, order, first, sg.size, device, fuse_relu)
        forwards.append((sg, reader,
                         Objectives(specs, sg.rows, device, directions), any(through), mask,
                         sg.rows == list(range(batch))))
    group_names = [s.target.diversity_group for s in specs]
    div_ids = {name: k for k, name in enumerate(dict.fromkeys(n for n in group_names if n))}
    diverse = any(s.target.diversity > 0 for s in specs)
    div_group = torch.tensor([div_ids.get(n, -1) if n else -1 for n in group_names], device=device)
    div_weight = torch.tensor([s.target.diversity for s in specs], device=device)
    c_max = max(li.shape[0] for li in layers if li.name in {s.target.layer for s in specs})
    redirect = [s.target.relu_gradient == "redirect" for s in specs]
    redirect_until = torch.tensor([(s.target.redirect_steps or math.inf) if r else -math.inf
                                   for s, r in zip(specs, redirect)], device=device)
    redirect_last = max((s.target.redirect_steps or math.inf) if r else -1
                        for s, r in zip(specs, redirect))

    # Per parameter group: clamp, and whether a clamp of a sigmoid image is a no-op (skipped).
    clamps, resolved_clamp = [], {}
    for g in params.groups:
        skip = []
        for i in g.rows_list:
            s = specs[i]
            noop = (s.param.squash == "sigmoid" and s.regularizer.clamp
                    and s.regularizer.clamp_range[0] <= 0 and s.regularizer.clamp_range[1] >= 1)
            skip.append(noop)
            if not s.regularizer.clamp:
                resolved_clamp[i] = "off"
            elif noop:
                resolved_clamp[i] = ("not applied: param.squash=sigmoid keeps the image inside "
                                     f"(0, 1) ⊂ {list(s.regularizer.clamp_range)}")
            elif g.plain:
                resolved_clamp[i] = (f"the optimized tensor, to {list(s.regularizer.clamp_range)} "
                                     f"in {s.regularizer.clamp_space} space")
            else:
                resolved_clamp[i] = (f"the image, to {list(s.regularizer.clamp_range)} in "
                                     f"{s.regularizer.clamp_space} space, projected back onto "
                                     f"the {s.param.kind} parameters")
        clamps.append(_Clamp(specs, g.rows_list, g.plain and g.space == "normalized", skip,
                             mean, std, device))

    projects = [kernels is not None and any(project_blur[i] for i in g.rows_list)
                for g in params.groups]
    project_blur_on = torch.tensor(project_blur, device=device)
    steps = torch.tensor([s.steps for s in specs], device=device)
    max_steps = max(s.steps for s in specs)
    blur_every = torch.tensor([s.blur.every for s in specs], device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16,
                              enabled=first.precision == "bf16" and device.type == "cuda")

    # --- state: fresh, or continued from saved states --------------------------------------------
    stride = _trace_stride(max_steps)
    trace = torch.full((max_steps // stride + 2, batch), math.nan, device=device)
    alive = torch.ones(batch, dtype=torch.bool, device=device)
    diverged_at = torch.full((batch,), -1, dtype=torch.long, device=device)
    before_blur = [_group_view(params, g).detach().clone() for g in params.groups]
    begin_list = [0] * batch
    saved_traces: dict[int, np.ndarray] = {}
    if states is not None:
        for g, opt, bb in zip(params.groups, opts, before_blur):
            for k, i in enumerate(g.rows_list):
                st = states[i]
                if st is None:
                    continue
                _check_state(st, specs[i], g)
                with torch.no_grad():
                    g.tensor[k] = st["params"].to(g.tensor)
                    bb[k] = st["before_blur"].to(bb)
                opt.set_row_state(k, st["optimizer"])
                begin_list[i] = int(st["step"])
                saved_traces[i] = np.asarray(st["trace"], dtype=np.float64).reshape(-1, 2)
    begin = torch.tensor(begin_list, device=device)
    start = min(begin_list)
    log_every = min(s.log_every for s in specs)
    label = f"[{first.model.label} {first.image.size}px {device.type} batch of {batch}]"
    progress = _Progress(max_steps, batch, label, emit, begin=start)
    kinds = sorted({s.param.kind for s in specs})
    emit(f"{label} optimizing {batch} image(s) for {max_steps} steps "
         f"({len({(s.target.layer, s.target.relu) for s in specs})} target(s), param "
         f"{'/'.join(kinds)}, {len(forwards)} forward(s) per step"
         f"{f', continuing from step {start}' if start else ''})")

    use_redirect = any(redirect)
    need_direct = any(not f[3] or f[4] is not None for f in forwards)

    def objective_values(tensors: Sequence[torch.Tensor], t: torch.Tensor, draws: list,
                         with_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) objective values and (B,) loss terms (penalties + diversity) at step `t` (a 0-d
        tensor, so a compiled step does not specialize on it); `draws`: per forward, its
        transform draws for this step (or None)."""
        need_pixels = penalties.any or any(f[3] for f in forwards)
        images = params.image(tensors) if need_pixels else None
        # The untransformed model input only where some image of a forward uses it (an FFT
        # image would otherwise be synthesized twice per step).
        direct = params.model_input(tensors) if need_direct else None
        seen = images
        if forward_blur_on is not None:
            seen = torch.where(forward_blur_on, blur_batch(images, kernels), images)
        acts, grams = [], []
        # Redirected gradients only while some image still asks for them (a Python flag set per
        # step by the loop: the mode costs a dispatch per op; compile refuses redirect anyway).
        mask = redirect_until > t if with_grad and loop.redirect else None
        for (sg, reader, objective, through, through_mask, whole), d in zip(forwards, draws):
            rows = None if whole else sg.rows_t
            x = None
            if direct is not None:
                x = direct if rows is None else direct[rows]
            if through:
                pix = seen if rows is None else seen[rows]
                moved = (transforms.apply(sg, pix, 0, draws=d) - mean) / std
                x = moved if through_mask is None else torch.where(through_mask, moved, x)
                x = x.contiguous(memory_format=layout)
            with autocast:
                if mask is not None:
                    with redirecting(mask if rows is None else mask[rows]):
                        feats = reader(x)
                else:
                    feats = reader(x)
                acts.append(objective(feats))
                if diverse:
                    grams.append(_grams(objective, feats, len(sg.rows), c_max))
        act = acts[0] if len(forwards) == 1 else _scatter(acts, forwards, batch, device)
        extra = torch.zeros(batch, device=device)
        if penalties.any:
            extra = extra + penalties(images)
        if diverse:
            g_all = grams[0] if len(forwards) == 1 else _scatter(grams, forwards, batch, device)
            extra = extra + div_weight * diversity_terms(g_all, div_group)
        return act, extra

    loop = _LoopState(alive=alive, diverged_at=diverged_at, before_blur=before_blur)

    def step(t: torch.Tensor, draws: list) -> torch.Tensor:
        """One update of every image (t: the step, 0-d tensor). Only tensor ops and branches
        fixed for the batch, no host syncs: it compiles as one graph (engine.compile)."""
        tensors = [g.tensor.detach().requires_grad_(True) for g in params.groups]
        act, extra = objective_values(tensors, t, draws, with_grad=True)
        grads = torch.autograd.grad((extra - act).sum(), tensors)
        with torch.no_grad():
            finite = torch.isfinite(act)
            for g, grad in zip(params.groups, grads):
                # Finite iff its largest and smallest values are (NaN propagates through both):
                # two reductions, ~12x faster than isfinite + all on a batch (no (B, ...) mask).
                dims = tuple(range(1, grad.dim()))
                ok = torch.isfinite(grad.amax(dim=dims)) & torch.isfinite(grad.amin(dim=dims))
                finite = finite.index_copy(0, g.rows, finite[g.rows] & ok)
            running = loop.alive & (t < steps) & (t >= begin)
            newly_bad = running & ~finite
            loop.diverged_at = torch.where(newly_bad, t.expand_as(loop.diverged_at),
                                           loop.diverged_at)
            loop.alive = loop.alive & ~newly_bad
            active = running & finite
            blur_due = active & project_blur_on & ((t + 1) % blur_every == 0)
            for gi, (g, opt, grad, clamp) in enumerate(zip(params.groups, opts, grads, clamps)):
                act_g = active[g.rows]
                shape = (-1,) + (1,) * (g.tensor.dim() - 1)
                opt.step(g.tensor, torch.nan_to_num(grad), act_g.view(shape))
                due = blur_due[g.rows]
                if g.plain:
                    # The notes' path: clamp and blur the optimized tensor itself.
                    if clamp.any:
                        clamp(g.tensor, act_g.view(-1, 1, 1, 1), in_place=True)
                    if kernels is not None:
                        d4 = due.view(-1, 1, 1, 1)
                        bb = loop.before_blur[gi]
                        torch.where(d4, g.tensor, bb, out=bb)
                        torch.where(d4, blur_batch(g.tensor, kernels[g.rows]), g.tensor,
                                    out=g.tensor)
                elif clamp.any or projects[gi]:
                    img = params.group_image(g)
                    if clamp.any:
                        img = clamp(img, act_g.view(-1, 1, 1, 1))
                    if kernels is not None:
                        d4 = due.view(-1, 1, 1, 1)
                        loop.before_blur[gi] = torch.where(d4, img, loop.before_blur[gi])
                        img = torch.where(d4, blur_batch(img, kernels[g.rows]), img)
                    params.project(g, img, act_g)
        return act.detach()

    run_step = compiled_step(step, first, device, forwards)

    # --- the loop -----------------------------------------------------------------------------
    done = start
    last_act = None
    t_now = torch.tensor(start, device=device)
    for t in range(start, max_steps):
        if should_stop is not None and should_stop():
            break
        draws = [transforms.draws(sg.rows, t) if sg.warped is not None else None
                 for sg, *_ in forwards]
        loop.redirect = use_redirect and t < redirect_last
        act = run_step(t_now, draws)
        with torch.no_grad():
            if t % stride == 0:
                trace[t // stride] = act
            t_now += 1
        done = t + 1
        if done % log_every == 0 or done == max_steps:
            last_act = act
            progress(done, last_act.tolist(), int(loop.alive.sum()))
    alive, diverged_at, before_blur = loop.alive, loop.diverged_at, loop.before_blur

    with torch.no_grad():
        final_draws = [transforms.draws(sg.rows, done) if sg.warped is not None else None
                       for sg, *_ in forwards]
        final, _ = objective_values(params.tensors, torch.tensor(done, device=device),
                                    final_draws, with_grad=False)
    if last_act is None or done % log_every:
        progress(done, final.tolist(), int(alive.sum()))  # the last line shows the final values
    seconds = time.perf_counter() - t_start
    trace_np = trace.cpu().numpy().astype(np.float64)
    final_np = final.float().cpu().numpy().astype(np.float64)
    diverged_np = diverged_at.cpu().numpy()
    with torch.no_grad():
        pixels = params.image()
    optimized = [None] * batch
    blurred = [None] * batch
    for gi, g in enumerate(params.groups):
        view = _group_view(params, g)
        bb = before_blur[gi]
        for k, i in enumerate(g.rows_list):
            optimized[i] = view[k]
            blurred[i] = bb[k] if project_blur[i] else view[k]

    outcomes = []
    fused = _fused(forwards)  # the same for every job of the batch
    for i, spec in enumerate(specs):
        n = min(spec.steps, done)
        rec = np.arange(begin_list[i], n)
        rec = rec[rec % stride == 0]
        acts = np.append(trace_np[rec // stride, i], final_np[i])
        steps_col = np.append(rec, n).astype(np.float64)
        if i in saved_traces:
            old = saved_traces[i]
            acts = np.concatenate([old[:, 1], acts])
            steps_col = np.concatenate([old[:, 0], steps_col])
        bad = int(diverged_np[i]) if diverged_np[i] >= 0 else None
        if bad is None and not np.isfinite(final_np[i]):
            bad = n  # the last update overflowed: the final image is not finite
        if bad is not None:
            keep = steps_col <= bad
            acts, steps_col = acts[keep], steps_col[keep]
            n = bad
        finite_acts = acts[np.isfinite(acts)]
        status = "diverged" if bad is not None else ("interrupted" if n < spec.steps else "ok")
        trace_i = np.column_stack([steps_col, acts])
        state = None
        if status == "interrupted":
            g, k = _locate(params, i)
            opt = opts[params.groups.index(g)]
            state = {"version": STATE_VERSION, "step": n, "param_kind": spec.param.kind,
                     "params": g.tensor[k].detach().cpu().clone(),
                     "before_blur": before_blur[params.groups.index(g)][k].detach().cpu().clone(),
                     "optimizer": opt.row_state(k), "trace": trace_i[:-1].copy()}
        outcomes.append(JobOutcome(
            status=status,
            activation=float(finite_acts[-1]) if finite_acts.size else None,
            activation_start=float(acts[0]) if np.isfinite(acts[0]) else None,
            steps_done=n,
            trace=trace_i,
            optimized=_hwc(optimized[i]),
            before_blur=_hwc(blurred[i]),
            pixels=_hwc(pixels[i]),
            seconds=seconds,
            device=_device_name(device),
            diverged_at=bad,
            info={"layer": spec.target.layer, "image_size": spec.image.size, "batch_size": batch,
                  "objective": spec.target.kind, "param": spec.param.kind,
                  "model_input_size": spec.transform.model_size(spec.image.size),
                  "forwards_per_step": len(forwards), "clamp": resolved_clamp[i],
                  "trace_stride": stride,
                  "memory_format": "channels_last" if layout == torch.channels_last else "contiguous",
                  "truncation": "graph" if not isinstance(forwards[0][1], LayerReader) else "hooks",
                  **fused},
            state=state,
        ))
    return outcomes


def _fused(forwards: list) -> dict[str, int]:
    """result.json's ``fused_batchnorms`` / ``fused_zero_pads`` / ``fused_relus``: how many the
    batch's graph readers folded into convolutions (engine.fuse_conv)."""
    out = {"fused_batchnorms": 0, "fused_zero_pads": 0, "fused_relus": 0}
    for f in forwards:
        fused = getattr(f[1], "fused", {})
        for part in ("batchnorm", "zero_pad", "relu"):
            out[f"fused_{part}s"] += fused.get(part, 0)
    return out


def _group_view(params: ImageParams, g: ParamGroup) -> torch.Tensor:
    """What JobOutcome.optimized shows for group g: the tensor itself for the notes' plain pixel
    parameterization (image.space units), the pixel image otherwise."""
    with torch.no_grad():
        return g.tensor if g.plain else params.group_image(g)


def _locate(params: ImageParams, i: int) -> tuple[ParamGroup, int]:
    for g in params.groups:
        if i in g.rows_list:
            return g, g.rows_list.index(i)
    raise KeyError(i)


def _check_state(state: dict, spec: RunSpec, g: ParamGroup) -> None:
    if state.get("version") != STATE_VERSION or state.get("param_kind") != spec.param.kind:
        raise ValueError("saved state does not match this featsweep version or parameterization")
    if tuple(state["params"].shape) != tuple(g.tensor.shape[1:]):
        raise ValueError(f"saved state has shape {tuple(state['params'].shape)}, expected "
                         f"{tuple(g.tensor.shape[1:])}")


def _grams(objective: Objectives, feats: dict, n: int, c_max: int) -> torch.Tensor:
    """(n, c_max, c_max) normalized Gram matrices of a forward's rows, each from its own target
    (zero-padded to the batch's widest layer; only Grams of one target are ever compared, since a
    diversity group shares its target)."""
    out = None
    for target, _, local, *_rest in objective.parts:
        g = gram(feats[target] if objective._single else feats[target][local])
        pad = c_max - g.shape[-1]
        if pad:
            g = torch.nn.functional.pad(g, (0, pad, 0, pad))
        if objective._single:
            return g
        out = g.new_zeros((n, c_max, c_max)) if out is None else out
        out = out.index_copy(0, local, g)
    assert out is not None
    return out


def _scatter(parts: list[torch.Tensor], forwards: list, batch: int, device: torch.device) -> torch.Tensor:
    """Put per-forward (n, ...) results back in batch order: (B, ...)."""
    out = parts[0].new_zeros((batch, *parts[0].shape[1:]))
    for part, f in zip(parts, forwards):
        out = out.index_copy(0, f[0].rows_t, part)
    return out


__all__ = ["JobOutcome", "TRACE_MAX", "load_network", "layer_shape", "resolve_device", "run_batch",
           "tune_cpu_allocator", "validate"]
