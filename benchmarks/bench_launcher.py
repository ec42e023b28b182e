"""Launcher cost per job: N-job sweeps of the tiny model at 1 step, whole command timed.

    python benchmarks/bench_launcher.py                  # N = 1, 100, 1000
    python benchmarks/bench_launcher.py --n 1 50         # other sizes
    python benchmarks/bench_launcher.py --profile 200    # cProfile of one 200-job sweep

The optimization of a 1-step, 32 px tiny-model job costs well under a millisecond per image, so
what a sweep pays beyond the N = 1 run (Python and torch start-up, model load) is the launcher:
Hydra composing each job's config (twice: Hydra's basic sweeper validates every job by composing
it before the launcher composes it again), validation, grouping, and each job's Hydra run_job
(.hydra/ files, log file) and featsweep's five files. Per-job overhead = (wall(N) - wall(1)) /
(N - 1). Prints a Markdown table; with --profile the 25 most expensive calls (cumulative).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["model=tiny", "image.size=32", "steps=1", "device=cpu", "log_every=1000"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def sweep_seconds(n: int, workdir: Path) -> float:
    """Wall seconds of `python -m featsweep -m ... seed=range(0,n)`."""
    sweep = workdir / f"sweep{n}"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "featsweep", "-m", *ARGS,
                           f"seed=range(0,{n})", f"hydra.sweep.dir={sweep}"], cwd=workdir,
                          env=_env(), capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"the {n}-job sweep failed:\n{proc.stderr[-3000:]}")
    done = sum(1 for d in sweep.iterdir() if (d / "result.json").is_file())
    if done != n:
        raise SystemExit(f"the {n}-job sweep wrote {done} results")
    return seconds


def profile(n: int, workdir: Path) -> None:
    import cProfile
    import pstats

    sys.path.insert(0, str(ROOT / "src"))
    os.chdir(workdir)
    sys.argv = ["featsweep", "-m", *ARGS, f"seed=range(0,{n})", "hydra.sweep.dir=profiled",
                "hydra/job_logging=disabled"]
    from featsweep.__main__ import main

    prof = cProfile.Profile()
    prof.enable()
    try:
        main()
    except SystemExit:
        pass
    prof.disable()
    pstats.Stats(prof).sort_stats("cumulative").print_stats(25)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[1, 100, 1000])
    parser.add_argument("--profile", type=int, default=None, metavar="N")
    ns = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="featsweep-launcher-") as tmp:
        if ns.profile:
            profile(ns.profile, Path(tmp))
            return 0
        sizes = sorted(set([1, *ns.n]))
        walls = {n: sweep_seconds(n, Path(tmp)) for n in sizes}
    print("| jobs | wall s | per-job overhead vs N = 1, ms |")
    print("| ---: | ---: | ---: |")
    for n in sizes:
        per = "" if n == 1 else f"{1000 * (walls[n] - walls[1]) / (n - 1):.1f}"
        print(f"| {n} | {walls[n]:.1f} | {per} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
