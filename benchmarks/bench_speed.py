#!/usr/bin/env python
"""Speed benchmark: ms per image-step of five ways to optimize a channel visualization.

One process, one model, one layer, one image size, one step count; every method is timed over
the same `--steps` steps after `--warmup` warm-up steps (the clock is read, after a CUDA
synchronize, at the end of warm-up step W and of step W + steps):

  notes     the lab notes' loop as written: the notes' "model" = the full network wrapped to return
            the channel mean at the layer (a forward hook), normalized-space parameter, SGD lr 0.01
            momentum 0.9 wd 1e-5, clamp to [0, 1], `cv2.blur` 3x3 on the CPU every step, optimizer
            rebuilt every step from its state_dict (the notes' image005 loop), B = 1
  lucent    Lucent 0.1.8 `render.render_vis`: pixel parameterization (`param.image(size,
            fft=False, decorrelate=False)`), transforms=[] (Lucent still appends its ImageNet
            normalize), fixed_image_size=size, default Adam lr 0.05, objective
            `channel(layer_with_underscores, ch)`, B = 1
  featsweep featsweep.engine.run_batch([spec]) with the notes' image005 settings, B = 1
  batched   featsweep.engine.run_batch(specs) at each B of --batches, per-image hyperparameters
            cycling through the notes' twelve runs (SGD/Adam, momentum 0/0.9, weight decay 0..0.1,
            no blur / box 3 / 5 / 7) with lr 0.01 x (1, 0.5, 2)[i % 3] and seed i
  floor     the bare minimum at each B (1 and --batches): forward to the target layer (a forward
            hook that raises stops the network there) + gradient of the channel mean w.r.t. the
            input, NCHW (contiguous); no featsweep code beyond building the network
  floor_cl  the same floor in channels-last (network weights and input)
  compiled  featsweep batched with engine.compile=true (torch.compile of the whole step,
            fullgraph) at each B
  graphs    CUDA only: featsweep batched with engine.cuda_graphs=true (the compiled step captured
            as a CUDA graph and replayed) at each B
  bf16      CUDA only: featsweep batched with precision=bf16 at each B; reports the mean |change|
            of the final activations against the fp32 batched run (same jobs, same seeds)
  lucent_fft  Lucent's defaults: `param.image(size)` (FFT, decorrelated, sigmoid) with
            `transform.standard_transforms` (pad 12, jitter 8, scale, rotate, jitter 4), Adam lr
            0.05, fixed_image_size=size, B = 1 (Lucent 0.1.8 calls kornia's pre-0.5 top-level
            `get_rotation_matrix2d` / `warp_affine`; they are pointed at kornia.geometry's here)
  fft       featsweep batched with the same settings (param=fft, transform=standard, Adam lr
            0.05) at each B of --batches: Lucent's work, per image, in one batch

The featsweep rows run the engine's defaults: channels-last, the FX graph cut, and eval-mode
BatchNorm and zero padding folded into the convolutions (`--memory-format contiguous` and
`--fuse-conv off` measure without them); the floors run the network as it is.

Every method runs the same network (`featsweep.models.build_model`: eval mode, parameters
frozen), each on its own deep copy (Lucent leaves hooks on every module it touches). glibc's
allocator is tuned for the whole process with `featsweep.engine.tune_cpu_allocator()` (the
engine's own setting), so every method gets it; on CUDA `torch.backends.cudnn.benchmark = True`
for every method, and the floor uses channels-last like the engine.

    python benchmarks/bench_speed.py --model efficientnet_lite0 --layer _blocks.10 --size 128
    python benchmarks/bench_speed.py --model inception_v3 --weights random --layer Mixed_7c \\
        --size 299 --device cuda --batches 12,64
    python benchmarks/bench_speed.py --quick          # CI smoke: tiny model, 32 px, few steps

Prints a markdown table (method, B, ms per image-step, speed-up vs Lucent, x floor at the same B)
and the estimated wall time of the notes' 12-run sweep at 10,000 steps; `--json FILE` saves all.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import math
import os
import platform
import re
import sys
import time
import traceback
import types
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn

from featsweep.engine import run_batch, tune_cpu_allocator
from featsweep.models import build_model
from featsweep.spec import IMAGENET_MEAN, IMAGENET_STD, MODELS, ModelSpec, from_config

NOTES_SWEEP_RUNS = 12
NOTES_SWEEP_STEPS = 10_000

# The notes' twelve runs (DESIGN.md): optimizer, momentum, weight decay, box blur side, target.
NOTES_RUNS = [
    ("sgd", 0.9, 0.0, 1, "post"),
    ("sgd", 0.0, 1e-5, 1, "post"),
    ("sgd", 0.9, 1e-5, 1, "post"),
    ("sgd", 0.9, 1e-1, 1, "post"),
    ("sgd", 0.9, 1e-5, 3, "post"),
    ("sgd", 0.9, 1e-5, 3, "pre"),
    ("sgd", 0.9, 1e-5, 5, "pre"),
    ("sgd", 0.9, 1e-5, 7, "pre"),
    ("sgd", 0.9, 1e-3, 5, "pre"),
    ("sgd", 0.9, 1e-1, 5, "pre"),
    ("sgd", 0.9, 1e-1, 3, "pre"),
    ("adam", 0.0, 1e-2, 3, "pre"),
]
LR_FACTORS = (1.0, 0.5, 2.0)

METHODS = ("notes", "lucent", "featsweep", "batched", "floor", "floor_cl", "lucent_fft", "fft",
           "compiled", "graphs", "bf16")
QUICK = {"model": "tiny", "weights": "random", "layer": "block3", "size": 32, "steps": 3,
         "warmup": 2, "batches": "4", "channel": 3, "threads": 1}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# timing


class Clock:
    """Reads the clock (after a CUDA synchronize) at the end of step `warmup` and `warmup+steps`."""

    def __init__(self, device: torch.device, warmup: int, steps: int) -> None:
        self.device, self.warmup, self.steps = device, warmup, steps
        self.times: dict[int, float] = {}
        self.faults: dict[int, int] = {}  # minor page faults of this process (glibc mmap churn)

    def tick(self, steps_done: int) -> None:
        if steps_done in (self.warmup, self.warmup + self.steps) and steps_done not in self.times:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.times[steps_done] = time.perf_counter()
            self.faults[steps_done] = _minor_faults()

    def faults_per_step(self) -> float | None:
        a, b = self.warmup, self.warmup + self.steps
        if a in self.faults and b in self.faults and self.faults[a] >= 0:
            return (self.faults[b] - self.faults[a]) / self.steps
        return None

    def seconds(self) -> float:
        a, b = self.warmup, self.warmup + self.steps
        if a not in self.times or b not in self.times:
            raise RuntimeError(f"clock marks missing: have steps {sorted(self.times)}, need {a}, {b}")
        return self.times[b] - self.times[a]


def _minor_faults() -> int:
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    except (ImportError, OSError):
        return -1


@dataclass
class Row:
    method: str
    label: str
    batch: int
    ms_per_image_step: float | None = None
    ms_per_step: float | None = None
    seconds: float | None = None
    peak_mem_mib: float | None = None
    minor_faults_per_step: float | None = None
    error: str | None = None
    detail: dict = field(default_factory=dict)


class _Stop(Exception):
    pass


# ----------------------------------------------------------------------------------------------
# the methods


def notes_loop(net: nn.Module, layer: str, channel: int, size: int, device: torch.device,
               clock: Clock, total: int) -> None:
    """The notes' image005 loop, as written (on `device` instead of `.cuda()`)."""
    import cv2
    import torch.optim as optim
    from torchvision import transforms

    class NotesModel(nn.Module):  # the notes' "model": full forward, returns the channel mean
        def __init__(self) -> None:
            super().__init__()
            self.net = net
            self.feat: torch.Tensor | None = None
            dict(net.named_modules())[layer].register_forward_hook(self._keep)

        def _keep(self, mod: nn.Module, inp: object, out: torch.Tensor) -> None:
            self.feat = out

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.net(x)
            return self.feat[:, channel].mean()

    model = NotesModel()
    norm = transforms.Normalize(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))
    opt_image = norm(torch.rand(1, 3, size, size)).to(device)
    opt_image.requires_grad_()

    before_blur = None
    optimizer = optim.SGD([opt_image], lr=0.01, momentum=0.9, weight_decay=1e-5)
    optimizer.zero_grad()

    for idx in range(total):
        out = model(opt_image)
        if idx % 500 == 0:
            log(f"  notes' loop: {idx} {out.item():.4g}")
        out.backward()  # as written (descends; the cost is the same either way)
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            torch.clamp_(opt_image, min=0.0, max=1.0)
            before_blur = opt_image.cpu().detach().squeeze().permute(1, 2, 0).numpy()
            opt_image = cv2.blur(before_blur, (3, 3), cv2.BORDER_DEFAULT)
            opt_image = torch.tensor(opt_image).permute(2, 0, 1).unsqueeze(0).to(device)
            opt_image.requires_grad_()

        state_dict = optimizer.state_dict()
        optimizer = optim.SGD([opt_image], lr=0.01, momentum=0.9, weight_decay=1e-5)
        optimizer.load_state_dict(state_dict)
        optimizer.zero_grad()
        clock.tick(idx + 1)


def _import_lucent(device: torch.device):  # noqa: ANN202
    """Import Lucent 0.1.8; put its parameters on `device`.

    Lucent installed with --no-deps (it pins kornia <= 0.4.1) may lack two imports it needs only
    for display: IPython.display (lucent.misc.io.showing) and tqdm (render_vis's progress bar,
    which progress=False disables). Where absent, they are stubbed with no-op modules.
    """
    try:
        import IPython.display  # noqa: F401  (only whether it imports)
    except ImportError:
        ipython = types.ModuleType("IPython")
        display = types.ModuleType("IPython.display")
        display.display = display.HTML = display.Image = lambda *a, **k: None  # type: ignore[attr-defined]
        ipython.display = display  # type: ignore[attr-defined]
        sys.modules.setdefault("IPython", ipython)
        sys.modules.setdefault("IPython.display", display)
    try:
        import tqdm  # noqa: F401
    except ImportError:
        stub = types.ModuleType("tqdm")
        stub.tqdm = lambda iterable=None, *a, **k: iterable  # type: ignore[attr-defined]
        sys.modules.setdefault("tqdm", stub)
    import lucent
    from lucent.optvis import objectives, param, render
    from lucent.optvis.param import spatial

    spatial.device = device  # Lucent picks cuda:0 whenever it exists; follow --device instead
    import kornia
    from kornia.geometry import transform as kgt
    from lucent.optvis import transform as ltransform

    ltransform.device = device
    # Lucent 0.1.8 was written for kornia <= 0.4.1, whose top level had these two functions.
    for name in ("get_rotation_matrix2d", "warp_affine"):
        if not hasattr(kornia, name):
            setattr(kornia, name, getattr(kgt, name))
    return lucent, objectives, param, render


def _timed_objective(objectives: types.ModuleType, layer: str, channel: int,
                     clock: Clock) -> Callable:
    """Lucent's channel objective that also reads the clock: it is called once per step, right
    after that step's forward, so calls W and W+steps are `steps` apart."""
    base = objectives.channel(layer.replace(".", "_"), channel)
    calls = [0]

    def timed(hook: Callable) -> torch.Tensor:
        calls[0] += 1
        clock.tick(calls[0])
        return base(hook)

    return timed


def lucent_loop(net: nn.Module, layer: str, channel: int, size: int, device: torch.device,
                clock: Clock, total: int) -> dict:
    _, objectives, param, render = _import_lucent(device)
    timed = _timed_objective(objectives, layer, channel, clock)
    render.render_vis(net, timed, param_f=lambda: param.image(size, fft=False, decorrelate=False),
                      transforms=[], thresholds=(total,), show_image=False, progress=False,
                      fixed_image_size=size)
    import importlib.metadata as md
    try:
        version = md.version("torch-lucent")
    except md.PackageNotFoundError:
        version = "?"
    return {"lucent_version": version}


def lucent_fft_loop(net: nn.Module, layer: str, channel: int, size: int, device: torch.device,
                    clock: Clock, total: int) -> dict:
    _, objectives, param, render = _import_lucent(device)
    from lucent.optvis import transform

    timed = _timed_objective(objectives, layer, channel, clock)
    render.render_vis(net, timed, param_f=lambda: param.image(size),
                      transforms=transform.standard_transforms, thresholds=(total,),
                      show_image=False, progress=False, fixed_image_size=size)
    return {"settings": "param.image(size): fft + decorrelate + sigmoid; standard_transforms"}


# Lucent's defaults as featsweep settings (experiment=lucent_defaults).
LUCENT_DEFAULTS = {"param": {"kind": "fft", "decay": 1.0, "decorrelate": True, "squash": "sigmoid",
                             "init_sd": 0.01},
                   "transform": {"pad": 12, "pad_mode": "constant", "pad_value": 0.5, "jitter": 8,
                                 "scale": [1 + (i - 5) / 50.0 for i in range(11)],
                                 "rotate": list(range(-10, 11)) + 5 * [0], "jitter_final": 4}}


def _spec_config(args: argparse.Namespace, i: int, batched: bool, total: int, log_every: int,
                 fft: bool = False, engine: dict | None = None, precision: str | None = None,
                 ) -> dict:
    cfg = _base_config(args, i, batched, total, log_every, fft)
    cfg["engine"] = {"memory_format": args.memory_format, "fuse_conv": args.fuse_conv == "on",
                     **(engine or {})}
    if precision:
        cfg["precision"] = precision
    return cfg


def _base_config(args: argparse.Namespace, i: int, batched: bool, total: int, log_every: int,
                 fft: bool = False) -> dict:
    if fft:
        cfg = _base_config(args, i, batched, total, log_every)
        cfg.update(copy.deepcopy(LUCENT_DEFAULTS))
        cfg["optimizer"] = {"name": "adam", "lr": 0.05, "momentum": 0.0, "nesterov": False,
                            "weight_decay": 0.0, "betas": [0.9, 0.999], "eps": 1e-8}
        cfg["target"]["relu"] = "post"
        cfg["regularizer"]["clamp"] = False
        cfg["blur"] = {"kind": "none", "k": 1, "sigma": None, "every": 1}
        cfg["image"]["space"] = "pixel"
        return cfg
    if batched:
        opt, momentum, wd, k, relu = NOTES_RUNS[i % len(NOTES_RUNS)]
        lr = 0.01 * LR_FACTORS[i % len(LR_FACTORS)]
        if args.relu == "post":
            relu = "post"
    else:  # B = 1: the notes' image005 (the loop `notes` times)
        opt, momentum, wd, k, relu, lr = "sgd", 0.9, 1e-5, 3, "post", 0.01
    return {
        "model": {"name": args.model, "weights": args.weights},
        "target": {"layer": args.layer, "channel": args.channel, "relu": relu},
        "optimizer": {"name": opt, "lr": lr, "momentum": momentum, "nesterov": False,
                      "weight_decay": wd, "betas": [0.9, 0.999], "eps": 1e-8},
        "regularizer": {"clamp": True, "clamp_range": [0.0, 1.0], "clamp_space": "normalized"},
        "blur": {"kind": "box" if k > 1 else "none", "k": k, "sigma": None, "every": 1},
        "image": {"size": args.size, "space": "normalized"},
        "steps": total, "seed": i, "device": args.device, "log_every": log_every,
        "precision": args.precision,
    }


def featsweep_loop(args: argparse.Namespace, batch: int, batched: bool, clock: Clock,
                   total: int, fft: bool = False, engine: dict | None = None,
                   precision: str | None = None) -> dict:
    log_every = math.gcd(clock.warmup, clock.steps)
    specs = [from_config(_spec_config(args, i, batched, total, log_every, fft, engine, precision))
             for i in range(batch)]
    pattern = re.compile(r" step (\d+)/")

    def emit(msg: str) -> None:
        m = pattern.search(msg)
        if m:
            clock.tick(int(m.group(1)))

    outcomes = run_batch(specs, emit=emit)
    status = sorted({o.status for o in outcomes})
    acts = [o.activation for o in outcomes if o.activation is not None]
    return {"statuses": status, "log_every": log_every,
            "final_activation_mean": (sum(acts) / len(acts)) if acts else None,
            "final_activations": [o.activation for o in outcomes],
            "engine": {k: outcomes[0].info.get(k)
                       for k in ("memory_format", "truncation", "fused_batchnorms", "fused_zero_pads",
                                 "fused_relus")},
            "settings": ("Lucent's defaults (fft, decorrelate, sigmoid, standard transforms, "
                         "Adam 0.05)" if fft else
                         "notes' image005 (SGD 0.9, wd 1e-5, box 3, post)" if not batched else
                         f"notes' 12 runs cycled, relu={args.relu}, lr x {LR_FACTORS}")}


def floor_loop(net: nn.Module, layer: str, channel: int, batch: int, size: int,
               device: torch.device, clock: Clock, total: int, precision: str,
               channels_last: bool = False) -> None:
    """Forward to `layer` (a hook raises) + input gradient of the channel means. Nothing else.
    `net` must already be in the layout `channels_last` asks for."""
    store: dict[str, torch.Tensor] = {}

    def stop(mod: nn.Module, inp: object, out: torch.Tensor) -> None:
        store["out"] = out
        raise _Stop

    handle = dict(net.named_modules())[layer].register_forward_hook(stop)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x0 = ((torch.rand(batch, 3, size, size) - mean) / std).to(device)
    if channels_last:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16,
                              enabled=precision == "bf16" and device.type == "cuda")
    try:
        for t in range(total):
            x = x0.detach().requires_grad_(True)
            with autocast:
                try:
                    net(x)
                except _Stop:
                    pass
                act = store.pop("out")[:, channel].float().mean(dim=(1, 2))
            (grad,) = torch.autograd.grad(act.sum(), x)
            clock.tick(t + 1)
    finally:
        handle.remove()


# ----------------------------------------------------------------------------------------------
# driver


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU: {cpu}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}"


def _loadavg() -> list[float] | None:
    """1/5/15-minute load averages: on a shared CPU they say how noisy the numbers are."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def run_method(row: Row, fn: Callable[[Clock, int], dict | None], device: torch.device,
               warmup: int, steps: int) -> Row:
    clock = Clock(device, warmup, steps)
    log(f"- {row.label} (B={row.batch}) ...")
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        detail = fn(clock, warmup + steps) or {}
        sec = clock.seconds()
        row.seconds = sec
        row.ms_per_step = 1000 * sec / steps
        row.ms_per_image_step = row.ms_per_step / row.batch
        row.minor_faults_per_step = clock.faults_per_step()
        row.detail.update(detail)
        log(f"  {row.ms_per_image_step:.3f} ms per image-step, "
            f"{row.minor_faults_per_step} minor page faults per step")
    except Exception as exc:  # noqa: BLE001 - one method failing must not lose the others
        row.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        log(f"  FAILED: {row.error}")
        log(traceback.format_exc())
    if device.type == "cuda":
        row.peak_mem_mib = torch.cuda.max_memory_allocated(device) / 2**20
    return row


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="featsweep model name (default efficientnet_lite0)")
    p.add_argument("--weights", help="pretrained | random | path (default: pretrained; tiny: random)")
    p.add_argument("--layer", help="target layer, module name with dots (default: the model's)")
    p.add_argument("--channel", type=int, help="target channel (default 7)")
    p.add_argument("--size", type=int, help="image side in px (default: the model's)")
    p.add_argument("--steps", type=int, help="timed steps (default 30 on CPU, 200 on CUDA)")
    p.add_argument("--warmup", type=int, help="untimed warm-up steps (default 5 CPU, 20 CUDA)")
    p.add_argument("--batches", help="featsweep batch sizes, comma-separated (default 12,64)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                   help="featsweep and floor precision (bf16 autocast, CUDA only)")
    p.add_argument("--relu", default="post", choices=("post", "notes"),
                   help="batched targets: all post-ReLU (like the floor), or the notes' mix of "
                        "post (runs 1-5) and pre (6-12; the layer must end in a ReLU)")
    p.add_argument("--methods", default="notes,lucent,featsweep,batched,floor,floor_cl,lucent_fft,fft",
                   help="subset of " + ",".join(METHODS) + " (compiled: slow to compile on a CPU; "
                        "graphs, bf16: CUDA only)")
    p.add_argument("--memory-format", default="auto", choices=("auto", "channels_last", "contiguous"),
                   help="featsweep rows' engine.memory_format (default auto = channels-last)")
    p.add_argument("--fuse-conv", default="on", choices=("on", "off"),
                   help="featsweep rows' engine.fuse_conv (default on: BatchNorm and zero pads "
                        "folded into the convolutions)")
    p.add_argument("--threads", type=int,
                   help="torch.set_num_threads for the whole run (default: torch's own)")
    p.add_argument("--quick", action="store_true",
                   help="CI smoke: tiny model, block3, 32 px, 2+3 steps, B=4, 1 thread (explicit flags "
                        "win)")
    p.add_argument("--json", help="write everything measured to this file")
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    args.model = args.model or "efficientnet_lite0"
    if args.model not in MODELS:
        p.error(f"--model must be one of {', '.join(MODELS)}")
    info = MODELS[args.model]
    args.weights = args.weights or ("random" if args.model == "tiny" else "pretrained")
    args.layer = args.layer or info.default_layer
    args.channel = 7 if args.channel is None else args.channel
    args.size = args.size or info.default_size
    args.batches = [int(b) for b in (args.batches or "12,64").split(",") if b.strip()]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        p.error(f"unknown --methods {sorted(unknown)}")
    return args


def fmt(x: float | None, digits: int = 2) -> str:
    if x is None or not math.isfinite(x):
        return "—"
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.{digits}f}"


def human(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.0f} s"


def report(meta: dict, rows: list[Row]) -> tuple[str, dict]:
    ok = {(r.method, r.batch): r.ms_per_image_step for r in rows if r.ms_per_image_step}
    lucent = ok.get(("lucent", 1))
    lines = [
        f"{meta['model']} ({meta['weights']}) at `{meta['layer']}` channel {meta['channel']}, "
        f"{meta['size']} px, {meta['steps']} timed steps after {meta['warmup']} warm-up, "
        f"{meta['precision']}; {meta['device']} ({meta['device_name']}); torch {meta['torch']}; "
        f"{meta['date']}",
        f"Allocator: {meta['allocator']}." + (f" {meta['cudnn']}" if meta["cudnn"] else ""),
        f"Load average (1/5/15 min) at start {meta['loadavg_start']}, at end {meta['loadavg_end']}.",
        "",
        "| method | B | ms / image-step | speed-up vs Lucent | × NCHW floor (same B) | × channels-last floor | page faults / step |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        floor = ok.get(("floor", r.batch))
        floor_cl = ok.get(("floor_cl", r.batch))
        if r.error:
            lines.append(f"| {r.label} | {r.batch} | failed: {r.error} | — | — | — | — |")
            continue
        ms = r.ms_per_image_step
        ref = ok.get(("lucent_fft", 1)) if r.method in ("fft", "lucent_fft") else lucent
        vs_l = f"{ref / ms:.2f}×" if ref and ms else "—"
        vs_f = f"{ms / floor:.2f}" if floor and ms else "—"
        vs_cl = f"{ms / floor_cl:.2f}" if floor_cl and ms else "—"
        pf = r.minor_faults_per_step
        pf_s = "—" if pf is None else f"{pf:,.0f}"
        lines.append(f"| {r.label} | {r.batch} | {fmt(ms)} | {vs_l} | {vs_f} | {vs_cl} | {pf_s} |")
    fp32 = {r.batch: r.detail.get("final_activations") for r in rows if r.method == "batched"}
    for r in rows:
        if r.method == "bf16" and fp32.get(r.batch) and r.detail.get("final_activations"):
            pairs = [(a, b) for a, b in zip(fp32[r.batch], r.detail["final_activations"])
                     if a is not None and b is not None]
            if pairs:
                diff = sum(abs(a - b) for a, b in pairs) / len(pairs)
                scale = sum(abs(a) for a, _ in pairs) / len(pairs)
                lines.append(f"- bf16 vs fp32 final activations at B={r.batch}: mean |Δ| "
                             f"{diff:.4g} (mean |activation| {scale:.4g}, {len(pairs)} jobs)")
    lines.append("")
    lines.append("Speed-up of the fft rows is against Lucent's defaults (lucent_fft), of the others "
                 "against Lucent's pixel run.")
    for (method, b), ms in sorted(ok.items()):
        if method == "fft" and ("batched", b) in ok:
            lines.append(f"- fft + standard transforms / pixel path (batched) at B={b}: "
                         f"{ms / ok[('batched', b)]:.2f}× per image-step (the model sees "
                         f"{meta['size'] + 24 - 12} px instead of {meta['size']}: pad 12, jitter crops 8 + 4)")
    n, s = NOTES_SWEEP_RUNS, NOTES_SWEEP_STEPS
    est: dict[str, float | None] = {
        "notes_loop_12x_B1_s": ok[("notes", 1)] * n * s / 1000 if ("notes", 1) in ok else None,
        "featsweep_basic_12x_B1_s": (ok[("featsweep", 1)] * n * s / 1000
                                     if ("featsweep", 1) in ok else None),
        "featsweep_batched_B12_s": (ok[("batched", 12)] * n * s / 1000
                                    if ("batched", 12) in ok else None),
        "floor_B12_s": ok[("floor", 12)] * n * s / 1000 if ("floor", 12) in ok else None,
    }
    lines += ["", f"Notes' {n}-run sweep at {s:,} steps, estimated wall time from the per-step "
              "costs above (optimization only, no start-up):"]
    names = {"notes_loop_12x_B1_s": "notes' loop, 12 runs one after another",
             "featsweep_basic_12x_B1_s": "featsweep basic (12 × B=1)",
             "featsweep_batched_B12_s": "featsweep batched (one B=12 batch)",
             "floor_B12_s": "floor at B=12 (bare forward + input gradient)"}
    for key, label in names.items():
        value = est[key]
        lines.append(f"- {label}: " + (human(value) if value is not None else "not measured"))
    return "\n".join(lines), est


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tune_cpu_allocator()  # the engine's glibc setting, for every method in this process
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        log("--device cuda: no CUDA device visible")
        return 2
    device = torch.device("cuda" if args.device == "cuda" or (
        args.device == "auto" and torch.cuda.is_available()) else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    cuda_default = device.type == "cuda"
    args.steps = args.steps or (200 if cuda_default else 30)
    args.warmup = args.warmup or (20 if cuda_default else 5)
    meta = {
        "model": args.model, "weights": args.weights, "layer": args.layer, "channel": args.channel,
        "size": args.size, "steps": args.steps, "warmup": args.warmup, "batches": args.batches,
        "precision": args.precision, "relu": args.relu, "device": str(device),
        "device_name": device_name(device), "torch": torch.__version__,
        "cuda": torch.version.cuda, "python": platform.python_version(),
        "host": platform.node(), "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "allocator": ("glibc tuned for every method via featsweep.engine.tune_cpu_allocator() "
                      "(mmap threshold 32 MiB, trim threshold 16 GiB, top pad 1 GiB, no mmap)"),
        "cudnn": ("cudnn.benchmark on for every method; floor and featsweep channels-last."
                  if device.type == "cuda" else ""),
        "argv": sys.argv[1:] if argv is None else argv,
        "loadavg_start": _loadavg(),
    }
    log(f"bench_speed: {meta['model']} {meta['layer']} {meta['size']}px on {meta['device_name']}")

    t0 = time.perf_counter()
    base = build_model(ModelSpec(args.model, args.weights))
    meta["model_build_s"] = time.perf_counter() - t0

    def net_copy(channels_last: bool = False) -> nn.Module:
        net = copy.deepcopy(base).to(device)
        return net.to(memory_format=torch.channels_last) if channels_last else net

    rows: list[Row] = []
    W, N = args.warmup, args.steps
    floor_net = net_copy(False) if "floor" in args.methods else None
    floor_cl_net = net_copy(True) if "floor_cl" in args.methods else None

    def floor_row(b: int) -> None:
        if "floor" in args.methods:
            rows.append(run_method(
                Row("floor", "floor: truncated fwd + input grad (NCHW)", b),
                lambda c, n: floor_loop(floor_net, args.layer, args.channel, b, args.size, device,
                                        c, n, args.precision), device, W, N))
        if "floor_cl" in args.methods:
            rows.append(run_method(
                Row("floor_cl", "floor, channels-last", b),
                lambda c, n: floor_loop(floor_cl_net, args.layer, args.channel, b, args.size,
                                        device, c, n, args.precision, channels_last=True),
                device, W, N))

    floor_row(1)
    if "notes" in args.methods:
        rows.append(run_method(Row("notes", "notes' loop (full fwd, cv2 blur, opt rebuilt)", 1),
                               lambda c, n: notes_loop(net_copy(), args.layer, args.channel,
                                                       args.size, device, c, n), device, W, N))
    if "lucent" in args.methods:
        rows.append(run_method(Row("lucent", "Lucent render_vis (pixel param, no transforms)", 1),
                               lambda c, n: lucent_loop(net_copy(), args.layer, args.channel,
                                                        args.size, device, c, n), device, W, N))
    if "featsweep" in args.methods:
        rows.append(run_method(Row("featsweep", "featsweep run_batch, B=1", 1),
                               lambda c, n: featsweep_loop(args, 1, False, c, n), device, W, N))
    if "lucent_fft" in args.methods:
        rows.append(run_method(Row("lucent_fft", "Lucent render_vis defaults (fft + standard "
                                   "transforms)", 1),
                               lambda c, n: lucent_fft_loop(net_copy(), args.layer, args.channel,
                                                            args.size, device, c, n), device, W, N))
    for b in args.batches:
        if "batched" in args.methods:
            rows.append(run_method(Row("batched", "featsweep run_batch, batched (per-image hp)", b),
                                   lambda c, n, b=b: featsweep_loop(args, b, True, c, n),
                                   device, W, N))
        if "compiled" in args.methods:
            rows.append(run_method(Row("compiled", "featsweep batched, engine.compile=true", b),
                                   lambda c, n, b=b: featsweep_loop(args, b, True, c, n,
                                                                    engine={"compile": True}),
                                   device, W, N))
        if "graphs" in args.methods and device.type == "cuda":
            rows.append(run_method(Row("graphs", "featsweep batched, engine.cuda_graphs=true", b),
                                   lambda c, n, b=b: featsweep_loop(args, b, True, c, n,
                                                                    engine={"cuda_graphs": True}),
                                   device, W, N))
        if "bf16" in args.methods and device.type == "cuda":
            rows.append(run_method(Row("bf16", "featsweep batched, precision=bf16", b),
                                   lambda c, n, b=b: featsweep_loop(args, b, True, c, n,
                                                                    precision="bf16"),
                                   device, W, N))
        if "fft" in args.methods:
            rows.append(run_method(Row("fft", "featsweep batched, fft + standard transforms", b),
                                   lambda c, n, b=b: featsweep_loop(args, b, True, c, n, fft=True),
                                   device, W, N))
        if b != 1:
            floor_row(b)

    meta["loadavg_end"] = _loadavg()
    table, est = report(meta, rows)
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": [asdict(r) for r in rows], "estimates_s": est}, f,
                      indent=2)
    return 1 if any(r.error for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
