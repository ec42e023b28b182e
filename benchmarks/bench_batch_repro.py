"""How far does a job's result move with its batch's size and composition?

    python benchmarks/bench_batch_repro.py                 # tiny + EfficientNet-Lite0, CPU
    python benchmarks/bench_batch_repro.py --quick         # tiny only (seconds)
    python benchmarks/bench_batch_repro.py --device cuda   # the same on a GPU

One job (seed 0) is optimized alone (B = 1, the exact-reproduction path,
``hydra.launcher.max_batch=1``), again alone (is B = 1 deterministic?), then as the first image of
batches of 2, 4 and 8 whose other images are other seeds, and of a batch of 4 with other mates.
Every run is one ``featsweep.engine.run_batch`` call, exactly as the batched launcher makes it.
For each, against the B = 1 run: the final activation's relative difference and the largest
pixel difference of image.npy. Prints a Markdown table (the README's Reproducibility figures).

Why the result can move at all: the image's own computation is independent of its batch-mates,
but convolution kernels pick other algorithms and summation orders for another batch size, so
the last bits of the activations differ, and the optimization amplifies them (a chaotic map).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

CASES = {
    "tiny": ["model=tiny", "image.size=32", "steps=60", "optimizer=adam", "blur=none"],
    "efficientnet_lite0": ["model=efficientnet_lite0", "image.size=96", "steps=60",
                           "image.space=normalized", "optimizer=adam", "optimizer.lr=0.05",
                           "blur=none"],
}


def spec_for(overrides: list[str], device: str):  # -> RunSpec
    from hydra import compose, initialize_config_dir

    from featsweep.spec import from_config

    conf = str(ROOT / "src" / "featsweep" / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, f"device={device}", "log_every=1000"])
    return from_config(cfg)


def measure(name: str, overrides: list[str], device: str) -> list[tuple[str, float, float, float]]:
    from featsweep.engine import run_batch

    base = spec_for(overrides, device)

    def job(seed: int):  # noqa: ANN202
        return dataclasses.replace(base, seed=seed)

    def first(specs: list) -> tuple[float, np.ndarray, float]:
        t0 = time.perf_counter()
        out = run_batch(specs, emit=lambda _: None)[0]
        return float(out.activation), out.pixels, time.perf_counter() - t0

    ref_act, ref_px, ref_s = first([job(0)])
    rows = [("alone (B=1)", 0.0, 0.0, ref_s)]
    plans = [("alone again (B=1)", [0]), ("B=2", [0, 1]), ("B=4", [0, 1, 2, 3]),
             ("B=4, other mates", [0, 11, 12, 13]), ("B=8", list(range(8)))]
    for label, seeds in plans:
        act, px, secs = first([job(s) for s in seeds])
        rows.append((label, abs(act - ref_act) / max(abs(ref_act), 1e-12),
                     float(np.abs(px - ref_px).max()), secs))
    print(f"\n{name} ({' '.join(overrides)}, {device}): seed 0's final activation "
          f"{ref_act:.6g} alone")
    print("| batch | activation, relative difference to B=1 | max pixel difference | s |")
    print("| --- | ---: | ---: | ---: |")
    for label, dact, dpx, secs in rows:
        print(f"| {label} | {dact:.2e} | {dpx:.2e} | {secs:.1f} |")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="the tiny model only")
    ns = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    for name, overrides in CASES.items():
        if ns.quick and name != "tiny":
            continue
        measure(name, overrides, ns.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
