#!/usr/bin/env python
"""The pieces of a batched step around the network, timed alone: µs per call and the ratios.

Each row pairs the way the engine does a thing with the way it did it before (or the
alternative it was measured against), on tensors of the batch's shapes, so that the choices in
featsweep.graph._ConvClamp, featsweep.optim and the engine's step can be checked on any machine:

- the ReLU6 after a convolution: out-of-place clamp vs in place on the conv's own output, and
  its gradient mask out of place vs in place (EfficientNet-Lite0's activations at 128 px);
- the optimizer step of a batch whose images are half SGD, half Adam (and all SGD, all Adam):
  the engine's BatchedOptimizer vs computing both updates for every image and selecting;
- the per-image finite check of the gradient: isfinite + all vs the largest and smallest value;
- the blur of a channels-last batch, as it is vs made NCHW first.

    python benchmarks/bench_step_parts.py                # B = 12, 128 px
    python benchmarks/bench_step_parts.py --batch 2 --size 32 --reps 3   # smoke
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Callable

import torch

from featsweep.blur import batch_kernels, blur_batch
from featsweep.engine import tune_cpu_allocator
from featsweep.optim import BatchedOptimizer
from featsweep.spec import BlurSpec, OptimizerSpec


def timed(fn: Callable[[], object], reps: int) -> float:
    """The mean of `reps` calls after 3 warm-up calls, in µs."""
    for _ in range(3):
        fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e6


def both_updates(opt: BatchedOptimizer, param: torch.Tensor, grad: torch.Tensor,
                 active: torch.Tensor) -> None:
    """The update as the engine computed it before this session: SGD's and Adam's for every
    image of a mixed batch, selected per image with torch.where (the same values)."""
    t = opt.adam_steps + active.to(torch.float64)
    d_p = grad.addcmul(param, opt.weight_decay)
    decay = torch.where(opt.is_adam, opt.beta1, opt.momentum)
    scale = torch.where(opt.is_adam, (1 - opt.beta1_64).float(), torch.ones_like(opt.beta1))
    new_buf = opt.buf * decay + d_p * scale
    update = torch.zeros_like(param)
    if opt.any_sgd:
        sgd_dir = torch.where(opt.nesterov, d_p + opt.momentum * new_buf, new_buf)
        update = torch.where(opt.is_adam, update, opt.lr * sgd_dir)
    new_sq = opt.sq
    if opt.any_adam:
        new_sq = opt.sq * opt.beta2 + (1 - opt.beta2_64).float() * d_p * d_p
        bias1 = (1 - opt.beta1_64 ** t.clamp(min=1)).float()
        bias2_sqrt = (1 - opt.beta2_64 ** t.clamp(min=1)).sqrt().float()
        adam_dir = (opt.lr / bias1) * new_buf / ((new_sq.sqrt() / bias2_sqrt) + opt.eps)
        update = torch.where(opt.is_adam, adam_dir, update)
    update = torch.where(active, update, torch.zeros_like(update))
    torch.where(active, new_buf, opt.buf)
    torch.where(active, new_sq, opt.sq)
    param.sub_(update)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--size", type=int, default=128, help="image side; activations scale with it")
    p.add_argument("--reps", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    tune_cpu_allocator()
    torch.manual_seed(0)
    cl = torch.channels_last
    b, s, reps = args.batch, args.size, args.reps
    rows: list[tuple[str, str, float, str, float]] = []

    def pair(what: str, old_name: str, old: Callable, new_name: str, new: Callable) -> None:
        rows.append((what, old_name, timed(old, reps), new_name, timed(new, reps)))

    with torch.no_grad():
        # EfficientNet-Lite0's largest ReLU6 inputs at this size: 96 channels at s/2, 144 at s/4.
        for c, side in ((96, s // 2), (144, s // 4)):
            x = (torch.randn(b, c, side, side) * 4).contiguous(memory_format=cl)
            g = torch.randn_like(x)
            y = x.clamp(0, 6)
            shape = f"({b}, {c}, {side}, {side})"
            pair(f"ReLU6 forward {shape}", "clamp (new tensor)", lambda: x.clamp(0, 6),
                 "clamp_ (in place)", lambda: x.clamp_(0, 6))
            pair(f"ReLU6 gradient {shape}", "hardtanh_backward",
                 lambda: torch.ops.aten.hardtanh_backward(g, y, 0.0, 6.0),
                 "in place", lambda: torch.ops.aten.hardtanh_backward.grad_input(
                     g, y, 0.0, 6.0, grad_input=g))

        param = torch.randn(b, 3, s, s).contiguous(memory_format=cl)
        grad = torch.randn_like(param)
        active = torch.ones(b, 1, 1, 1, dtype=torch.bool)

        def spec(name: str) -> OptimizerSpec:
            return OptimizerSpec(name=name, lr=0.05, momentum=0.9, nesterov=False,
                                 betas=(0.9, 0.999), weight_decay=1e-5, eps=1e-8)

        half = max(b // 2, 1)
        for label, kinds in (("half SGD, half Adam", ["sgd"] * half + ["adam"] * (b - half)),
                             ("all SGD", ["sgd"] * b), ("all Adam", ["adam"] * b)):
            opt = BatchedOptimizer.create([spec(k) for k in kinds], param)
            pair(f"optimizer step, {label}", "both updates + where",
                 lambda: both_updates(opt, param, grad, active),
                 "BatchedOptimizer.step", lambda: opt.step(param, grad, active))

        dims = (1, 2, 3)
        pair(f"finite check ({b}, 3, {s}, {s})", "isfinite + all",
             lambda: torch.isfinite(grad).flatten(1).all(dim=1),
             "amax & amin", lambda: torch.isfinite(grad.amax(dim=dims)) & torch.isfinite(
                 grad.amin(dim=dims)))

        kernels = batch_kernels([BlurSpec(kind="box" if k > 1 else "none", k=k, sigma=None,
                                          every=1, mode="project") for k in [1, 3, 5] * b][:b])
        image = torch.rand(b, 3, s, s).contiguous(memory_format=cl)
        from kornia.filters import filter2d
        pair(f"blur ({b}, 3, {s}, {s}), 5x5", "filter2d on channels-last",
             lambda: filter2d(image, kernels, border_type="reflect"),
             "blur_batch (NCHW first)", lambda: blur_batch(image, kernels))

    print(f"B = {b}, {s} px, {torch.get_num_threads()} threads, {reps} calls each; µs per call\n")
    print("| piece | before | µs | now | µs | before / now |")
    print("| --- | --- | ---: | --- | ---: | ---: |")
    for what, old_name, old, new_name, new in rows:
        print(f"| {what} | {old_name} | {old:.0f} | {new_name} | {new:.0f} | {old / new:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
