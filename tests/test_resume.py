"""Resume and the reproducibility record.

``resume=true`` re-runs a sweep into the same ``hydra.sweep.dir`` and skips every job whose
result.json says ok for the same config (``config_hash``: the job's resolved config without the
``hydra`` node and without ``resume``) and whose files are all there; skipped jobs are not touched
(same mtimes, not even Hydra's ``.hydra/`` under the batched launcher). Missing, failed, diverged,
interrupted and changed jobs run again. Both launchers: the batched launcher decides before any
work; under ``hydra/launcher=basic`` the task checks and returns early (Hydra's ``run_job`` still
rewrites ``.hydra/`` there, the job's own files stay untouched).

Reproducibility: result.json records featsweep's version and git commit, torch/CUDA versions,
device name and hostname; the same config twice on the CPU gives a bit-identical image.npy.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import featsweep
from featsweep import app
from featsweep.artifacts import FILES, completed, config_hash, git_commit, write_job
from featsweep.engine import JobOutcome

from _cli import run_module

CONF = str(Path(featsweep.__file__).resolve().parent / "conf")
SMALL = ["model=tiny", "device=cpu", "image.size=32", "steps=8", "optimizer=adam"]


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "Traceback" not in out
    return out


def mtimes(job: Path) -> dict[str, int]:
    return {str(p.relative_to(job)): p.stat().st_mtime_ns for p in sorted(job.rglob("*"))
            if p.is_file()}


def result(job: Path) -> dict:
    return json.loads((job / "result.json").read_text())


# Composing sets Hydra's global version base (1.3); restore Hydra's singletons after each test so
# that later in-process Hydra suites (tests/test_launcher.py) still see their defaults.
pytestmark = pytest.mark.usefixtures("hydra_restore_singletons")


# ------------------------------------------------------------------------------ config_hash


def composed(*overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def test_config_hash_ignores_hydra_and_resume_but_sees_every_setting() -> None:
    base = app.config_hash(composed(*SMALL))
    assert base == app.config_hash(composed(*SMALL))  # stable
    assert base == app.config_hash(composed(*SMALL, "resume=true"))
    assert base == app.config_hash(composed(*SMALL, "hydra.sweep.dir=/elsewhere",
                                            "hydra.job.name=other"))
    cfg = composed(*SMALL)
    OmegaConf.set_struct(cfg, False)
    del cfg["hydra"]
    assert base == app.config_hash(cfg)  # what the task sees (Hydra removed its node)
    for change in ("steps=9", "optimizer.lr=0.02", "seed=1", "blur.k=5", "optimizer=sgd",
                   "target.relu=pre", "log_every=10"):
        assert app.config_hash(composed(*SMALL, change)) != base, change
    # Plain containers: key order does not matter.
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})


def outcome(status: str = "ok") -> JobOutcome:
    img = np.zeros((4, 4, 3), np.float32)
    return JobOutcome(status=status, activation=1.0, activation_start=0.0, steps_done=3,
                      trace=np.array([[0.0, 0.0], [1.0, 1.0]]), optimized=img, before_blur=img,
                      pixels=img, seconds=0.1, device="cpu")


def test_completed_needs_ok_the_same_hash_and_every_file(tmp_path: Path) -> None:
    job = tmp_path / "0"
    write_job(job, outcome(), {"config_hash": "abc"})
    assert completed(job, "abc")["status"] == "ok"
    assert completed(job, "other") is None  # changed config
    assert completed(tmp_path / "missing", "abc") is None
    for status in ("failed", "diverged", "interrupted"):
        write_job(job, outcome(status), {"config_hash": "abc"})
        assert completed(job, "abc") is None, status
    write_job(job, outcome(), {"config_hash": "abc"})
    (job / "image.npy").unlink()
    assert completed(job, "abc") is None  # a file is gone
    write_job(job, outcome())  # written before config hashes existed
    assert completed(job, "abc") is None
    (job / "result.json").write_text("{not json")
    assert completed(job, "abc") is None


# ---------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_batched_resume_skips_finished_jobs_and_reruns_the_rest(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    common = ["-m", *SMALL, "hydra.launcher.max_batch=2", f"hydra.sweep.dir={sweep}"]
    ok(run_module("featsweep", *common, "seed=0,1,2,3", cwd=tmp_path))
    first = {i: mtimes(sweep / str(i)) for i in range(4)}
    images = {i: np.load(sweep / str(i) / "image.npy") for i in range(4)}
    assert all(result(sweep / str(i))["config_hash"] for i in range(4))

    # Nothing changed: nothing runs, nothing is touched (not even .hydra/ or the job log).
    out = ok(run_module("featsweep", *common, "seed=0,1,2,3", "resume=true", cwd=tmp_path))
    assert "resume: 4 of 4 jobs already finished ok" in out
    assert "optimizing" not in out
    assert {i: mtimes(sweep / str(i)) for i in range(4)} == first

    # Job 1 lost its result, job 2 was interrupted, job 3 now asks for another seed.
    (sweep / "1" / "result.json").unlink()
    res2 = result(sweep / "2")
    (sweep / "2" / "result.json").write_text(json.dumps({**res2, "status": "interrupted"}))
    out = ok(run_module("featsweep", *common, "seed=0,1,2,7", "resume=true", cwd=tmp_path))
    assert "resume: 1 of 4 jobs already finished ok" in out and "#0" in out
    assert "Batched 3 jobs into 2 batch(es)" in out
    assert mtimes(sweep / "0") == first[0]  # untouched
    for i in (1, 2, 3):
        res = result(sweep / str(i))
        assert res["status"] == "ok" and res["steps"] == 8
        assert mtimes(sweep / str(i))["image.npy"] != first[i]["image.npy"]
    assert OmegaConf.load(sweep / "3" / ".hydra" / "config.yaml").seed == 7
    for i in (1, 2):  # the same config again: the same image
        np.testing.assert_allclose(np.load(sweep / str(i) / "image.npy"), images[i], atol=1e-5)
    assert np.abs(np.load(sweep / "3" / "image.npy") - images[3]).max() > 1e-3  # another seed


@pytest.mark.slow
def test_basic_launcher_resume_checks_in_the_task(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    common = ["-m", *SMALL, "hydra/launcher=basic", f"hydra.sweep.dir={sweep}"]
    ok(run_module("featsweep", *common, "seed=0,1", cwd=tmp_path))
    before = {i: mtimes(sweep / str(i)) for i in range(2)}
    out = ok(run_module("featsweep", *common, "seed=0,2", "resume=true", cwd=tmp_path))
    assert "already finished ok for this config; skipped" in out
    after0 = mtimes(sweep / "0")
    for name in FILES:  # the job's own files; Hydra's run_job rewrote .hydra/ (its own)
        assert after0[name] == before[0][name], name
    assert mtimes(sweep / "1")["image.npy"] != before[1]["image.npy"]
    assert OmegaConf.load(sweep / "1" / ".hydra" / "config.yaml").seed == 2
    assert result(sweep / "1")["status"] == "ok"


@pytest.mark.slow
def test_same_config_twice_gives_the_same_image_and_a_full_record(tmp_path: Path) -> None:
    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        ok(run_module("featsweep", *SMALL, "blur.k=3", f"hydra.run.dir={run}", cwd=tmp_path))
    a, b = (np.load(run / "image.npy") for run in runs)
    assert a.dtype == np.float32 and np.array_equal(a, b)  # bit-identical
    ra, rb = (result(run) for run in runs)
    assert ra["activation"] == rb["activation"] and ra["config_hash"] == rb["config_hash"]
    import torch

    assert ra["featsweep_version"] == featsweep.__version__
    assert ra["torch_version"] == torch.__version__ and ra["cuda_version"] == torch.version.cuda
    assert ra["git_commit"] == git_commit()
    assert ra["device"] == "cpu" and ra["device_name"] and ra["hostname"]
    assert ra["steps_requested"] == 8 and ra["python_version"]


def test_git_commit_is_this_checkout_or_none() -> None:
    src = Path(featsweep.__file__).resolve().parent
    proc = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True,
                          text=True)
    expected = proc.stdout.strip() if proc.returncode == 0 else None
    commit = git_commit()
    assert commit is None or commit == expected
    if (src.parents[1] / ".git").exists():
        assert commit == expected


def test_clear_job_removes_what_a_killed_write_left(tmp_path: Path) -> None:
    """A process killed inside atomic_write leaves ``.NAME.XXXX.tmp``; a rerun of the job
    clears it with the job's old files (the chaos test found one left behind)."""
    from featsweep.artifacts import FILES, clear_job

    names = [*FILES, ".image.png.ab12cd.tmp", ".result.json.zz.tmp", "keep.txt"]
    for name in names:
        (tmp_path / name).write_text("x")
    clear_job(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
