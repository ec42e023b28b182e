"""The sweep directory: one live sweep (lock), no silent overwrite, resume matched by config.

In-process units for the lock, the directory check, the renaming of earlier job directories
(``featsweep.sweepdir.arrange``), the version rule of resume (``featsweep.jobs.judge``) and
durable writes; end to end (``python -m featsweep -m``), one small sweep followed by the runs a
user makes next: a second sweep into the same directory (refused, nothing touched), the same
sweep with its overrides in another order (nothing reruns: same mtimes), one with a changed
``steps`` (the log says what changed), and ``resume=true`` into a directory that does not exist.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from omegaconf import OmegaConf

import featsweep
from featsweep import jobs
from featsweep.artifacts import atomic_write, write_job
from featsweep.engine import JobOutcome
from featsweep.errors import UserError
from featsweep.sweepdir import (LOCK, SweepDirCallback, SweepLock, arrange, check_sweep_dir,
                                config_diff)

from _cli import run_module

SMALL = ["model=tiny", "device=cpu", "image.size=32", "steps=4", "optimizer=adam", "log_every=2"]


def outcome(status: str = "ok") -> JobOutcome:
    img = np.zeros((4, 4, 3), np.float32)
    return JobOutcome(status=status, activation=1.0, activation_start=0.5, steps_done=3,
                      trace=np.array([[0.0, 0.5], [1.0, 1.0]]), optimized=img, before_blur=img,
                      pixels=img, seconds=0.1, device="cpu")


def fake_job(where: Path, digest: str, **extra: Any) -> None:
    write_job(where, outcome(), {"config_hash": digest, "featsweep_version": featsweep.__version__,
                                 **extra})
    (where / ".hydra").mkdir(exist_ok=True)


def mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in (LOCK, "multirun.yaml")}  # Hydra rewrites the latter


# ------------------------------------------------------------------------------------- lock


def test_a_live_lock_refuses_a_second_sweep_naming_its_holder(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK).write_text(json.dumps({
            "host": SweepLock(tmp_path).record["host"], "pid": holder.pid,
            "started": "2026-12-01T10:00:00+00:00", "command": "featsweep -m seed=0,1"}))
        with pytest.raises(UserError) as err:
            SweepLock(tmp_path).acquire()
        text = str(err.value)
        assert f"another sweep is running in {tmp_path.resolve()}" in text
        assert f"PID {holder.pid}" in text and "2026-12-01T10:00:00+00:00" in text
        assert "featsweep -m seed=0,1" in text and "another hydra.sweep.dir" in text
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_is_taken_over_and_released(tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = SweepLock(tmp_path)
    (tmp_path / LOCK).write_text(json.dumps({"host": lock.record["host"], "pid": dead.pid,
                                             "started": "yesterday"}))
    lock.acquire()
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    assert "taking over a stale sweep lock" in caplog.text and f"PID {dead.pid}" in caplog.text
    lock.release()
    assert not (tmp_path / LOCK).exists()


def test_a_lock_of_another_host_is_never_taken_over(tmp_path: Path) -> None:
    (tmp_path / LOCK).write_text(json.dumps({"host": "node042", "pid": 1, "started": "now"}))
    with pytest.raises(UserError, match="on node042 as PID 1"):
        SweepLock(tmp_path).acquire()


def test_resume_obeys_the_lock(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The callback Hydra runs before a multirun: resume=true into a live sweep's directory is
    refused the same way (one paragraph, exit 1), and the directory is left as it was."""
    fake_job(tmp_path / "0", "abc")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        record = {"host": SweepLock(tmp_path).record["host"], "pid": holder.pid, "started": "x"}
        (tmp_path / LOCK).write_text(json.dumps(record))
        cfg = OmegaConf.create({"resume": True, "hydra": {"sweep": {"dir": str(tmp_path)}}})
        with pytest.raises(SystemExit) as stop:
            SweepDirCallback().on_multirun_start(config=cfg)
        assert stop.value.code == 1
        err = capsys.readouterr().err
        assert "another sweep is running" in err and err.count("\n") == 1
        assert json.loads((tmp_path / LOCK).read_text()) == record  # not taken
    finally:
        holder.kill()
        holder.wait()


# ------------------------------------------------------------------------- directory check


def test_check_sweep_dir_rules(tmp_path: Path) -> None:
    check_sweep_dir(tmp_path / "new", resume=False)  # a new directory: fine
    with pytest.raises(UserError, match=r"resume=true, but hydra.sweep.dir=.* does not exist"):
        check_sweep_dir(tmp_path / "new", resume=True)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "multirun.yaml").write_text("{}")  # Hydra's file is not a job
    with pytest.raises(UserError, match="holds no jobs, so there is nothing to resume"):
        check_sweep_dir(tmp_path / "empty", resume=True)
    fake_job(tmp_path / "old" / "0", "abc")
    (tmp_path / "old" / "1" / ".hydra").mkdir(parents=True)  # started, never finished
    with pytest.raises(UserError) as err:
        check_sweep_dir(tmp_path / "old", resume=False)
    assert "already holds 2 job(s) of an earlier sweep (0, 1: 1 ok, 1 no result)" in str(err.value)
    assert "add resume=true" in str(err.value) and "hydra.sweep.dir=OTHER" in str(err.value)
    check_sweep_dir(tmp_path / "old", resume=True)


# ----------------------------------------------------------------------------- resume units


def test_arrange_moves_each_result_to_its_jobs_number_without_touching_files(
        tmp_path: Path) -> None:
    for name, digest in (("0", "h-a"), ("1", "h-b"), ("2", "h-c"), ("3", "h-old")):
        fake_job(tmp_path / name, digest)
    before = {d: mtimes(tmp_path / d) for d in "0123"}
    # New order: c, a, b, plus a new config at #3 (whose number holds an unmatched old job).
    moved = arrange(tmp_path, [("0", "h-c"), ("1", "h-a"), ("2", "h-b"), ("3", "h-new")])
    assert moved == {"2": "0", "0": "1", "1": "2"}
    read = {d: json.loads((tmp_path / d / "result.json").read_text())["config_hash"]
            for d in "0123"}
    assert read == {"0": "h-c", "1": "h-a", "2": "h-b", "3": "h-old"}
    assert mtimes(tmp_path / "0") == before["2"] and mtimes(tmp_path / "1") == before["0"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".featsweep-move")]
    # An unmatched directory in the way of a move is kept under a free number, never lost.
    moved = arrange(tmp_path, [("3", "h-c")])
    assert moved["0"] == "3"
    assert json.loads((tmp_path / moved["3"] / "result.json").read_text())["config_hash"] == "h-old"


def test_config_diff_names_what_changed() -> None:
    old = {"steps": 800, "optimizer": {"lr": 0.1, "name": "sgd"}, "seed": 0}
    new = {"steps": 1000, "optimizer": {"lr": 0.05, "name": "sgd"}, "seed": 0}
    assert config_diff(old, new) == "optimizer.lr 0.1 -> 0.05, steps 800 -> 1000"


def test_resume_reruns_another_versions_result_unless_told(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("featsweep.artifacts.git_commit", lambda: "c" * 40)
    fake_job(tmp_path, "abc", featsweep_version="0.0.1", git_commit="b" * 40)
    verdict = jobs.judge(tmp_path, "abc")
    assert verdict.kind == "rerun"
    assert (f"written by another version (featsweep 0.0.1 -> {featsweep.__version__}, git commit "
            f"bbbbbbbbbb -> cccccccccc); resume_any_version=true keeps such results"
            == verdict.reason)
    kept = jobs.judge(tmp_path, "abc", accept_any_version=True)
    assert kept.kind == "done" and "featsweep 0.0.1 ->" in kept.reason
    # Same version, another commit: kept, and the difference is reported.
    fake_job(tmp_path, "abc", git_commit="b" * 40)
    same = jobs.judge(tmp_path, "abc")
    assert same.kind == "done" and "git commit bbbbbbbbbb -> cccccccccc" in same.reason


def test_resume_verdicts(tmp_path: Path) -> None:
    assert jobs.judge(tmp_path / "none", "abc").kind == "missing"
    fake_job(tmp_path, "abc")
    assert jobs.judge(tmp_path, "abc").kind == "done"
    assert jobs.judge(tmp_path, "other").kind == "changed"
    write_job(tmp_path, outcome("interrupted"), {"config_hash": "abc",
                                                "featsweep_version": featsweep.__version__})
    assert jobs.judge(tmp_path, "abc").kind == "rerun"  # interrupted without a state
    (tmp_path / "state.pt").write_bytes(b"x")
    assert jobs.judge(tmp_path, "abc").kind == "resumable"


def test_writes_are_durable_file_then_directory(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real = os.fsync

    def spy(fd: int) -> None:
        synced.append("dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "file")
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    atomic_write(tmp_path / "result.json", lambda f: f.write(b"{}"))
    assert synced == ["file", "dir"]  # the data, then the rename in its directory


def test_a_job_is_durable_with_one_directory_sync_after_every_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """write_job: each file's data is synced before its rename, and the directory once, after
    result.json's rename, which makes every rename of the job durable (result.json marks the
    job complete, so nothing it describes may be lost when it is not)."""
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "file")
        real_fsync(fd)

    def replace(src: str, dst: str) -> None:
        events.append("rename " + Path(dst).name)
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write_job(tmp_path, outcome("ok"), {"config_hash": "abc"})
    renames = [e for e in events if e.startswith("rename")]
    assert renames[-1] == "rename result.json" and len(renames) == 5
    assert events[-1] == "dir" and events.count("dir") == 1
    for i, e in enumerate(events):
        if e.startswith("rename"):
            assert events[i - 1] == "file", events  # its data first


# ------------------------------------------------------------------------------ end to end


def sweep_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_module("featsweep", "-m", *args, cwd=cwd)


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "Traceback" not in out
    return out


@pytest.mark.slow
def test_sweep_dir_safety_and_resume_by_config(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    first = ["blur.k=1,3", "optimizer.lr=0.05,0.1"]
    ok(sweep_cli(tmp_path, *SMALL, "blur=box", *first, f"hydra.sweep.dir={sweep}"))
    before = mtimes(sweep)
    configs = {d.name: OmegaConf.load(d / ".hydra" / "config.yaml") for d in sweep.iterdir()
               if d.is_dir()}

    # A different sweep into the same directory: refused, one paragraph, nothing touched.
    proc = sweep_cli(tmp_path, *SMALL, "seed=5,6", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert f"hydra.sweep.dir={sweep.resolve()} already holds 4 job(s) of an earlier sweep" \
        in proc.stderr and "add resume=true" in proc.stderr
    assert mtimes(sweep) == before

    # The same sweep, overrides in another order: every job is found by its config, nothing
    # reruns and no file is touched.
    out = ok(sweep_cli(tmp_path, *SMALL, "blur=box", "optimizer.lr=0.05,0.1", "blur.k=1,3",
                       "resume=true", f"hydra.sweep.dir={sweep}"))
    assert "resume: 4 of 4 jobs already finished ok for the same config" in out
    assert "renamed to the number of the job with the same config" in out
    assert "optimizing" not in out
    assert sorted(mtimes(sweep).values()) == sorted(before.values())
    for d in sweep.iterdir():  # dir N now holds job N of the new order
        if d.is_dir():
            hydra = OmegaConf.load(d / ".hydra" / "overrides.yaml")
            assert OmegaConf.load(d / ".hydra" / "config.yaml") in configs.values(), hydra

    # steps changed: every job reruns, and the log says what changed.
    out = ok(sweep_cli(tmp_path, *SMALL[:-3], "steps=5", "optimizer=adam", "log_every=2",
                       "blur=box", "optimizer.lr=0.05,0.1", "blur.k=1,3", "resume=true",
                       f"hydra.sweep.dir={sweep}"))
    assert "resume: 4 job(s) changed since the earlier run, rerun: #0 (steps 4 -> 5)" in out
    for d in (sweep / str(i) for i in range(4)):
        res = json.loads((d / "result.json").read_text())
        assert res["status"] == "ok" and res["steps"] == 5
        assert res["batch_size"] == 4 and res["batch_jobs"] == [0, 1, 2, 3]
