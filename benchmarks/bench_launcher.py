"""Launcher cost per job: N-job sweeps of the tiny model at 1 step, whole command timed.

    python benchmarks/bench_launcher.py                  # N = 1, 100, 1000; 3 rounds
    python benchmarks/bench_launcher.py --n 1 50 --rounds 1   # other sizes
    python benchmarks/bench_launcher.py --profile 200    # cProfile of one 200-job sweep

The optimization of a 1-step, 32 px tiny-model job costs well under a millisecond per image, so
what a sweep pays beyond the N = 1 run (Python and torch start-up, model load) is the launcher:
Hydra composing each job's config (twice: Hydra's basic sweeper validates every job by composing
it before the launcher composes it again), validation, grouping, and each job's Hydra run_job
(.hydra/ files, log file) and featsweep's five files. Per-job overhead = (wall(N) - wall(1)) /
(N - 1), from the medians over rounds (the sizes alternate within a round, so drift is shared;
the first, untimed run warms the file cache). Beside the wall time, the processes' CPU time
(user + system): on a shared virtual machine wall time also holds time stolen by other guests,
and the kernel's inode allocation slows after many files were deleted (ext4's search past
recently deleted inodes: each sweep here creates 11 inodes per job, and the sweeps are deleted).
Prints a Markdown table; with --profile the 25 most expensive calls (cumulative).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import shutil
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


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def sweep_seconds(n: int, workdir: Path) -> tuple[float, float]:
    """Wall and CPU seconds of `python -m featsweep -m ... seed=range(0,n)`."""
    sweep = workdir / f"sweep{n}"
    if sweep.exists():
        shutil.rmtree(sweep)
    cpu = _children_cpu()
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "featsweep", "-m", *ARGS,
                           f"seed=range(0,{n})", f"hydra.sweep.dir={sweep}"], cwd=workdir,
                          env=_env(), capture_output=True, text=True)
    seconds = time.perf_counter() - start
    cpu = _children_cpu() - cpu
    if proc.returncode != 0:
        raise SystemExit(f"the {n}-job sweep failed:\n{proc.stderr[-3000:]}")
    done = sum(1 for d in sweep.iterdir() if (d / "result.json").is_file())
    if done != n:
        raise SystemExit(f"the {n}-job sweep wrote {done} results")
    return seconds, cpu


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
        main(end_process=False)
    except SystemExit:
        pass
    prof.disable()
    pstats.Stats(prof).sort_stats("cumulative").print_stats(25)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[1, 100, 1000])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", type=int, default=None, metavar="N")
    ns = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="featsweep-launcher-") as tmp:
        if ns.profile:
            profile(ns.profile, Path(tmp))
            return 0
        sizes = sorted(set([1, *ns.n]))
        sweep_seconds(1, Path(tmp))  # warm-up: imports and model files into the page cache
        runs: dict[int, list[tuple[float, float]]] = {n: [] for n in sizes}
        for r in range(ns.rounds):
            for n in sizes:
                runs[n].append(sweep_seconds(n, Path(tmp)))
                print(f"round {r + 1}: {n} jobs {runs[n][-1][0]:.1f} s wall, "
                      f"{runs[n][-1][1]:.1f} s CPU", file=sys.stderr, flush=True)
    wall = {n: statistics.median(w for w, _ in runs[n]) for n in sizes}
    cpu = {n: statistics.median(c for _, c in runs[n]) for n in sizes}
    print(f"Medians of {ns.rounds} round(s); load average at the end "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}.")
    print()
    print("| jobs | wall s | per-job overhead vs N = 1, ms (wall) | CPU s | per job, ms (CPU) |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for n in sizes:
        per = "" if n == 1 else f"{1000 * (wall[n] - wall[1]) / (n - 1):.1f}"
        per_cpu = "" if n == 1 else f"{1000 * (cpu[n] - cpu[1]) / (n - 1):.1f}"
        print(f"| {n} | {wall[n]:.1f} | {per} | {cpu[n]:.1f} | {per_cpu} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
