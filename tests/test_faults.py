"""Faults: signals mid-sweep, jobs that raise, and files that are never half-written.

SIGINT/SIGTERM while a sweep runs: the launcher's handlers (``featsweep.app.InterruptGuard``)
set a flag that the engine polls every step. Finished jobs stay complete; the running batch's
jobs are written with status ``interrupted`` and their last image; batches not started are not
run and get nothing written; the process prints one line saying how to resume and exits with
128 + the signal's number. ``resume=true`` then finishes the sweep, and the result equals an
uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

import featsweep
from featsweep import app
from featsweep.app import InterruptGuard
from featsweep.artifacts import FILES, atomic_write

from _cli import cli_env

CONF = str(Path(featsweep.__file__).resolve().parent / "conf")


def composed(*overrides: str) -> Any:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=list(overrides))


# Composing sets Hydra's global version base (1.3); restore Hydra's singletons after each test so
# that later in-process Hydra suites (tests/test_launcher.py) still see their defaults.
pytestmark = pytest.mark.usefixtures("hydra_restore_singletons")


# ---------------------------------------------------------------------------- in-process units


def test_guard_turns_a_signal_into_a_flag_and_restores_the_handlers() -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with InterruptGuard() as guard:
        assert not guard.requested()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # the handler runs in the main thread at the next bytecode
        assert guard.requested() and guard.signame == "SIGTERM"
    assert {s: signal.getsignal(s) for s in before} == before


def test_a_second_signal_stops_at_once_with_the_resume_line(capsys: pytest.CaptureFixture[str]) -> None:
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as stop:
        with InterruptGuard("/some/sweep"):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    assert stop.value.code == 128 + signal.SIGINT
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "resume=true hydra.sweep.dir=/some/sweep" in err
    assert signal.getsignal(signal.SIGINT) == before


def test_engine_ends_running_images_as_interrupted_with_their_last_image() -> None:
    import torch

    from featsweep.engine import run_batch
    from featsweep.spec import from_config

    spec = from_config(composed("model=tiny", "device=cpu", "image.size=32", "steps=50",
                                "optimizer=adam"))
    short = from_config(composed("model=tiny", "device=cpu", "image.size=32", "steps=3",
                                 "optimizer=adam", "seed=1"))
    polls = []

    def stop() -> bool:
        polls.append(1)
        return len(polls) > 5  # stop before the 6th step

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        long_run, short_run = run_batch([spec, short], emit=lambda _: None, should_stop=stop)
        (alone,) = run_batch([spec], emit=lambda _: None, should_stop=lambda: len(polls) > 5)
    finally:
        torch.set_num_threads(threads)
    assert long_run.status == "interrupted" and long_run.steps_done == 5
    assert short_run.status == "ok" and short_run.steps_done == 3  # it had finished
    assert np.isfinite(long_run.pixels).all() and long_run.trace.shape == (6, 2)
    assert alone.status == "interrupted" and alone.steps_done == 0  # flag already set: no step


def test_atomic_write_never_leaves_half_a_file(tmp_path: Path) -> None:
    path = tmp_path / "result.json"
    atomic_write(path, lambda f: f.write(b'{"status": "ok"}'))

    def crash(f: Any) -> None:
        f.write(b'{"status": "ha')
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        atomic_write(path, crash)
    assert path.read_text() == '{"status": "ok"}'  # the old file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # no temporary left over
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # not mkstemp's private 0600


def test_a_job_that_raises_leaves_a_failed_result(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Under Hydra's basic launcher each job is app.task: an error (here a CUDA out-of-memory)
    is recorded in result.json and re-raised, so Hydra marks that job failed and runs the next."""
    def oom(*_: Any, **__: Any) -> None:
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr("featsweep.engine.run_batch", oom)
    monkeypatch.setattr(app, "job_dir", lambda: tmp_path)
    cfg = composed("model=tiny", "device=cpu", "image.size=32", "steps=3")
    with pytest.raises(RuntimeError, match="out of memory"):
        app.task(cfg)
    res = json.loads((tmp_path / "result.json").read_text())
    assert res["status"] == "failed" and "out of memory" in res["error"]
    assert res["config_hash"] == app.config_hash(cfg) and res["steps_requested"] == 3


# ---------------------------------------------------------------------------- end to end

SWEEP = ["model=tiny", "device=cpu", "image.size=32", "optimizer=adam", "log_every=100"]


def start(cwd: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "featsweep", "-m", *args], cwd=cwd,
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def signal_when(proc: subprocess.Popen[str], ready: Any, sig: int = signal.SIGTERM,
                timeout: float = 300) -> tuple[str, str]:
    """Read the sweep's log (stdout) line by line; send `sig` once ready(lines) is true."""
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        lines.append(line)
        if ready(lines):
            proc.send_signal(sig)
            break
        assert time.monotonic() < deadline, "".join(lines[-20:])
    else:
        pytest.fail("the sweep ended before the signal:\n" + "".join(lines[-20:]))
    out, err = proc.communicate(timeout=timeout)
    return "".join(lines) + out, err


def run_to_end(cwd: Path, *args: str) -> str:
    proc = start(cwd, *args)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, (out + err)[-4000:]
    return out + err


def mtimes(job: Path) -> dict[str, int]:
    return {str(p.relative_to(job)): p.stat().st_mtime_ns for p in sorted(job.rglob("*"))
            if p.is_file()}


def result(job: Path) -> dict:
    return json.loads((job / "result.json").read_text())


@pytest.mark.slow
def test_sigterm_mid_sweep_then_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    """6 jobs in batches of 2 (600 steps each). SIGTERM once batch 2 has done 100 steps:
    jobs 0-1 complete, 2-3 interrupted with their image, 4-5 not started; resume=true finishes
    2-5 without touching 0-1, and every job then equals the uninterrupted run's, bit for bit."""
    args = [*SWEEP, "steps=600", "seed=0,1,2,3,4,5", "hydra.launcher.max_batch=2"]
    sweep, reference = tmp_path / "sweep", tmp_path / "reference"

    def batch_2_under_way(lines: list[str]) -> bool:
        return "step 100/600" in lines[-1] and any("Batch 2/3" in line for line in lines)

    out, err = signal_when(start(tmp_path, *args, f"hydra.sweep.dir={sweep}"), batch_2_under_way)
    assert "Traceback" not in out + err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err  # one line: what happened and how to resume
    assert lines[0].startswith("featsweep: interrupted by SIGTERM. 2 job(s) finished, 2 written "
                               "as interrupted, 2 not started.")
    assert f"resume=true hydra.sweep.dir={sweep.resolve()}" in lines[0]
    for i in (0, 1):
        assert result(sweep / str(i))["status"] == "ok"
    for i in (2, 3):
        res = result(sweep / str(i))
        assert res["status"] == "interrupted" and 100 <= res["steps"] < 600, res
        assert res["steps_requested"] == 600
        for name in FILES:
            assert (sweep / str(i) / name).is_file()
        assert (sweep / str(i) / "state.pt").is_file()  # what resume continues from
    assert not (sweep / "4").exists() and not (sweep / "5").exists()
    finished = {i: mtimes(sweep / str(i)) for i in (0, 1)}

    out = run_to_end(tmp_path, *args, f"hydra.sweep.dir={sweep}", "resume=true")
    assert "resume: 2 of 6 jobs already finished ok" in out
    assert "resume: 2 interrupted job(s) continue from their saved state: #2 (interrupted after" \
        in out
    assert "continuing from step" in out  # not from step 0
    assert not (sweep / "2" / "state.pt").exists()  # finished: the state is gone
    assert {i: mtimes(sweep / str(i)) for i in (0, 1)} == finished  # untouched

    run_to_end(tmp_path, *args, f"hydra.sweep.dir={reference}")
    for i in range(6):
        got, want = result(sweep / str(i)), result(reference / str(i))
        assert got["status"] == want["status"] == "ok" and got["steps"] == 600
        assert got["activation"] == want["activation"]
        assert got["config_hash"] == want["config_hash"]
        assert np.array_equal(np.load(sweep / str(i) / "image.npy"),
                              np.load(reference / str(i) / "image.npy"))
        assert (sweep / str(i) / "trace.csv").read_text() == \
            (reference / str(i) / "trace.csv").read_text()

    from featsweep.analysis import collect

    a, b = collect(sweep), collect(reference)
    assert a["status"].tolist() == b["status"].tolist() == ["ok"] * 6
    assert a["activation"].tolist() == b["activation"].tolist()
    assert a["raw.brightness"].tolist() == b["raw.brightness"].tolist()


@pytest.mark.slow
def test_sigterm_under_the_basic_launcher_stops_the_sweep(tmp_path: Path) -> None:
    """hydra/launcher=basic: the running job is written as interrupted, no later job starts."""
    sweep = tmp_path / "sweep"
    proc = start(tmp_path, *SWEEP, "steps=600", "seed=0,1,2", "hydra/launcher=basic",
                 f"hydra.sweep.dir={sweep}")

    def job_1_under_way(lines: list[str]) -> bool:
        return "step 100/600" in lines[-1] and any("files in" in line for line in lines)

    out, err = signal_when(proc, job_1_under_way)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "Traceback" not in out + err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "resume=true hydra.sweep.dir=" in lines[0], err
    assert result(sweep / "0")["status"] == "ok"
    res = result(sweep / "1")
    assert res["status"] == "interrupted" and 100 <= res["steps"] < 600
    assert (sweep / "1" / "image.npy").is_file()
    assert not (sweep / "2").exists()


@pytest.mark.slow
def test_sigterm_reaches_batched_submitit_tasks(tmp_path: Path) -> None:
    """backend=submitit_local: the signal to the submitting process is passed on to the running
    tasks, which write their jobs as interrupted; the sweep ends with the resume line."""
    sweep = tmp_path / "sweep"
    proc = start(tmp_path, *SWEEP, "steps=5000", "seed=0,1", "hydra.launcher.max_batch=2",
                 "hydra.launcher.backend=submitit_local", f"hydra.sweep.dir={sweep}")
    deadline = time.monotonic() + 300
    while not any("step 100/5000" in log.read_text()
                  for log in sweep.glob(".submitit/*/*_log.out")):
        assert proc.poll() is None and time.monotonic() < deadline, "the task never got going"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, (out + err)[-3000:]
    assert "Traceback" not in out + err
    assert "2 written as interrupted" in err and "resume=true" in err
    for i in (0, 1):
        res = result(sweep / str(i))
        assert res["status"] == "interrupted" and 100 <= res["steps"] < 5000, res
        assert (sweep / str(i) / "image.npy").is_file()
