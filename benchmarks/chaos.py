"""Kill-and-resume chaos run: a sweep SIGKILLed at random moments, resumed each time, must end
exactly where an uninterrupted run ends.

    python benchmarks/chaos.py                       # 12 jobs in 4 batches, 5 kills (CI size)
    python benchmarks/chaos.py --jobs 48 --batches 8 --kills 20 --steps 1000 --seed 3

What it does, in a scratch directory (``--dir``, default a temporary one):

1. the reference: the sweep (``model=tiny``, CPU, one seed per job, ``max_batch`` so that the jobs
   form ``--batches`` batches) run once, uninterrupted;
2. the same sweep started, SIGKILLed (the whole process group) at a random moment of its work,
   and restarted with ``resume=true``, ``--kills`` times; then resumed once more without a kill.
   A moment is a random one of the log lines still to come (a progress line, a batch start, a
   job written), plus a random fraction of a second: on a busy machine a delay in seconds
   would mostly land in Python's start-up;
3. checks: every job ``ok``; each job's image.npy and trace.csv bit-identical to the reference;
   a job once ``ok`` is never written again by a later run (its result.json keeps its inode and
   mtime: "ok exactly once"); no stray directory, temporary file, state.pt or lock left.

SIGKILL gives no chance to clean up: the run relies on atomic writes (a file is whole or absent),
on result.json being written last, on the stale-lock takeover, and on resume re-forming a batch
that a kill left half written (README, "Long sweeps, clusters and faults"). Prints one line per
run and a summary; exit status 1 when a check fails. ``tests/test_chaos.py`` runs it at CI size.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

BASE = ["model=tiny", "device=cpu", "image.size=32", "optimizer=adam", "log_every=25"]


@dataclass
class Report:
    kills: list[float] = field(default_factory=list)  # seconds after start of each kill
    ok_after_kill: list[int] = field(default_factory=list)  # jobs ok after each kill
    runs: int = 0
    reference_s: float = 0.0
    problems: list[str] = field(default_factory=list)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def _start(cwd: Path, args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "featsweep", "-m", *args], cwd=cwd,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _milestone(line: str) -> bool:
    """A log line that marks progress: a batch starts, a progress line, a job written."""
    return " step " in line or "Batch " in line or "activation" in line


def _ok_results(sweep: Path) -> dict[str, tuple[int, int]]:
    """{job dir: (inode, mtime_ns) of its result.json} for the jobs whose status is ok."""
    out = {}
    for d in sweep.iterdir() if sweep.is_dir() else ():
        path = d / "result.json"
        try:
            if json.loads(path.read_text()).get("status") == "ok":
                st = path.stat()
                out[d.name] = (st.st_ino, st.st_mtime_ns)
        except (OSError, ValueError):
            continue
    return out


def run(workdir: Path, jobs: int = 12, batches: int = 4, kills: int = 5, steps: int = 300,
        seed: int = 0, log=print) -> Report:
    """The chaos run in `workdir` (see the module docstring); returns what happened."""
    rng = random.Random(seed)
    max_batch = -(-jobs // batches)
    args = [*BASE, f"steps={steps}", "seed=" + ",".join(str(i) for i in range(jobs)),
            f"hydra.launcher.max_batch={max_batch}"]
    report = Report()
    reference, sweep = workdir / "reference", workdir / "chaos"

    t0 = time.monotonic()
    proc = _start(workdir, [*args, f"hydra.sweep.dir={reference}"])
    out, _ = proc.communicate()
    report.reference_s = time.monotonic() - t0
    if proc.returncode != 0:
        report.problems.append(f"reference run failed: {out[-2000:]}")
        return report
    per_job = sum(_milestone(line) for line in out.splitlines()) / jobs
    log(f"reference: {jobs} jobs in {batches} batches of <= {max_batch}, "
        f"{report.reference_s:.1f} s")

    first_ok: dict[str, tuple[int, int]] = {}

    def check_ok_once() -> None:
        now = _ok_results(sweep)
        for name, stamp in first_ok.items():
            if now.get(name) != stamp:
                report.problems.append(f"job {name} was written again after it was ok "
                                       f"(run {report.runs})")
        for name, stamp in now.items():
            first_ok.setdefault(name, stamp)

    for k in range(kills + 1):
        resume = ["resume=true"] if sweep.exists() and any(
            (d / ".hydra").is_dir() or (d / "result.json").is_file()
            for d in sweep.iterdir()) else []
        proc = _start(workdir, [*args, f"hydra.sweep.dir={sweep}", *resume])
        report.runs += 1
        assert proc.stdout is not None
        if k < kills:
            left = max(1, round(per_job * (jobs - len(_ok_results(sweep)))))
            target, seen, t_run = rng.randint(0, left), 0, time.monotonic()
            for line in proc.stdout:  # the kill moment: after `target` milestones (0: start-up)
                seen += _milestone(line)
                if seen >= target:
                    break
            time.sleep(rng.uniform(0, 0.1))
            landed = proc.poll() is None
            if landed:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            report.kills.append(round(time.monotonic() - t_run, 2) if landed else float("nan"))
            check_ok_once()
            report.ok_after_kill.append(len(_ok_results(sweep)))
            log(f"run {report.runs}: {'killed' if landed else 'ended before the kill'} after "
                f"{seen} of ~{left} log milestones, {report.ok_after_kill[-1]}/{jobs} jobs ok")
        else:
            out, _ = proc.communicate()
            if proc.returncode != 0:
                report.problems.append(f"final resume failed: {out[-2000:]}")
                return report
            check_ok_once()
            log(f"run {report.runs}: resumed to the end")

    names = sorted(d.name for d in sweep.iterdir() if d.is_dir() and not d.name.startswith("."))
    if names != sorted(str(i) for i in range(jobs)):
        report.problems.append(f"job directories {names}, expected 0..{jobs - 1}")
    for i in range(jobs):
        a, b = sweep / str(i), reference / str(i)
        res = json.loads((a / "result.json").read_text()) if (a / "result.json").is_file() else {}
        if res.get("status") != "ok":
            report.problems.append(f"job {i}: status {res.get('status')}")
            continue
        for name in ("image.npy", "trace.csv"):
            if (a / name).read_bytes() != (b / name).read_bytes():
                report.problems.append(f"job {i}: {name} differs from the uninterrupted run")
    leftovers = [str(p.relative_to(sweep)) for p in sweep.rglob("*")
                 if p.name.endswith(".tmp") or p.name in ("state.pt", ".featsweep.lock")
                 or p.name.startswith(".featsweep-move")]
    if leftovers:
        report.problems.append(f"left behind: {leftovers}")
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=12)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill moments")
    parser.add_argument("--dir", type=Path, default=None, help="scratch directory (kept)")
    ns = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="featsweep-chaos-") as tmp:
        workdir = ns.dir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        report = run(workdir, ns.jobs, ns.batches, ns.kills, ns.steps, ns.seed)
    landed = sum(1 for t in report.kills if t == t)
    print(f"{report.runs} runs, {landed} of {len(report.kills)} kills landed mid-run; jobs ok "
          f"after each kill: {report.ok_after_kill}")
    if report.problems:
        print("FAILED:\n  " + "\n  ".join(report.problems))
        return 1
    print("OK: every job ok exactly once, bit-identical to the uninterrupted run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
