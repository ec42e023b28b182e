#!/usr/bin/env python
"""Whole-command timing of a 12-job sweep of the README's kind: batched launcher vs basic.

Runs, as separate processes (start-up, composition, model load, optimization and files all
counted), alternating A B A B ... to share the machine's drift:

    python -m featsweep -m optimizer=sgd,adam blur.k=1,3,5 seed=0,1 image.size=128 steps=N \\
        device=cpu hydra/launcher=batched|basic hydra.sweep.dir=TMP

and prints each run's wall time, the medians and the ratio basic / batched.

    python benchmarks/bench_sweep.py                 # 128 px, 60 steps, 2 rounds
    python benchmarks/bench_sweep.py --steps 5 --size 32 --model tiny --rounds 1   # smoke
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time


def sweep_command(args: argparse.Namespace, launcher: str, out: str) -> list[str]:
    cmd = [sys.executable, "-m", "featsweep", "-m", "optimizer=sgd,adam", "blur.k=1,3,5",
           "seed=0,1", f"image.size={args.size}", f"steps={args.steps}", "device=cpu",
           f"model={args.model}", f"hydra/launcher={launcher}", f"hydra.sweep.dir={out}",
           f"log_every={args.steps}"]
    if args.model == "tiny":
        cmd.append("target.channel=12")
    return cmd


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the runs")
    args = p.parse_args(argv)
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env["OMP_NUM_THREADS"] = str(args.threads)
    times: dict[str, list[float]] = {"batched": [], "basic": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for launcher in ("batched", "basic"):
                out = os.path.join(tmp, f"{launcher}{r}")
                t0 = time.perf_counter()
                proc = subprocess.run(sweep_command(args, launcher, out), env=env,
                                      capture_output=True, text=True)
                wall = time.perf_counter() - t0
                if proc.returncode != 0:
                    print(proc.stderr[-3000:], file=sys.stderr)
                    return 1
                times[launcher].append(wall)
                print(f"round {r + 1} {launcher:8s} {wall:7.1f} s", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n12-job sweep, {args.model} {args.size} px, {args.steps} steps, OMP_NUM_THREADS="
          f"{args.threads}, load {os.getloadavg()[0]:.2f}: batched {med['batched']:.1f} s, basic "
          f"{med['basic']:.1f} s (medians of {args.rounds}); basic / batched = "
          f"{med['basic'] / med['batched']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
