"""Tests for featsweep's Hydra launcher (``hydra/launcher=batched``).

1. Hydra's own launcher suites, parametrized the way Hydra's plugin repositories do. Their apps
   have their own task functions, so they exercise the launcher's one-job-at-a-time fallback.
2. The featsweep path end to end, as a user runs it (``python -m featsweep -m ...`` in a
   subprocess): a sweep runs as ONE batch, gives the same images as ``hydra/launcher=basic``,
   keeps a diverging job to itself, and refuses a sweep with a bad value before any work.
3. The launcher's batching logic in-process: grouping by batch key, and the split-and-retry that
   keeps one failing job (or an out-of-memory batch) from costing the others.

Sizes are kept small (tiny model, 32-64 px, <= 20 steps): these run on 2 shared CPU cores.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import gc
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from hydra.test_utils.launcher_common_tests import (
    BatchedSweeperTestSuite,
    IntegrationTestSuite,
    LauncherTestSuite,
)
from omegaconf import OmegaConf
from PIL import Image
from pytest import mark, param

from hydra_plugins.featsweep_batched_launcher import _plan as plan, _run_local as run_local
from hydra_plugins.featsweep_batched_launcher import _sweep as launcher_sweep

from _cli import cli_env, run_module

# ------------------------------------------------------------------------ Hydra's launcher suites


@mark.parametrize("launcher_name, overrides", [("batched", [])])
class TestBatchedLauncher(LauncherTestSuite):
    pass


@mark.parametrize(
    "launcher_name, overrides",
    [("batched", ["hydra/sweeper=basic", "hydra.sweeper.max_batch_size=2"])],
)
class TestBatchedLauncherWithSweeperBatches(BatchedSweeperTestSuite):
    """The sweeper calls launch() three times; job numbers must continue across the calls."""


@mark.parametrize(
    "task_launcher_cfg, extra_flags",
    [
        param(
            {},
            [
                "-m",
                "hydra/launcher=batched",
                "hydra/hydra_logging=disabled",
                "hydra/job_logging=disabled",
            ],
            id="batched_launcher_multirun",
        )
    ],
)
class TestBatchedLauncherIntegration(IntegrationTestSuite):
    pass


@mark.usefixtures("hydra_restore_singletons")
def test_suite_sweeps_go_through_the_batched_launcher(hydra_sweep_runner: Any, tmpdir: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The suites above really run BatchedLauncher (not some default), once per sweep, in order."""
    calls = []
    frozen = []  # gc.get_freeze_count() inside each job, and after the launch
    real_launch = launcher_sweep.launch

    def spy(launcher: Any, job_overrides: Any, initial_job_idx: int) -> Any:
        calls.append((type(launcher).__name__, [list(o) for o in job_overrides], initial_job_idx))
        try:
            return real_launch(launcher, job_overrides, initial_job_idx)
        finally:
            frozen.append(gc.get_freeze_count())

    monkeypatch.setattr(launcher_sweep, "launch", spy)
    sweep = hydra_sweep_runner(
        calling_file=None,
        calling_module="hydra.test_utils.a_module",
        task_function=lambda cfg: (frozen.append(gc.get_freeze_count()), cfg.a * 10)[1],
        config_path="configs",
        config_name="compose",
        overrides=["hydra/launcher=batched", "+a=1,2,3"],
        temp_dir=tmpdir,
    )
    with sweep:
        assert sweep.returns is not None
        (returns,) = sweep.returns
        assert [r.return_value for r in returns] == [10, 20, 30]
        assert [r.hydra_cfg.hydra.job.num for r in returns] == [0, 1, 2]
        assert [r.overrides for r in returns] == [["+a=1"], ["+a=2"], ["+a=3"]]
    assert calls == [("BatchedLauncher", [["+a=1"], ["+a=2"], ["+a=3"]], 0)]
    # The sweep's objects are kept out of the cycle collector during the launch, and given back
    # when it ends (_sweep.launch).
    assert len(frozen) == 4 and all(n > 0 for n in frozen[:3]) and frozen[3] == 0, frozen


# ------------------------------------------------------------------------ featsweep end to end

JOB_FILES = ("image.png", "before_blur.png", "image.npy", "trace.csv", "result.json")
SMALL = ["model=tiny", "device=cpu"]
HEADLINE = ["optimizer=sgd,adam", "blur.k=3,5,7", *SMALL, "image.size=64", "steps=20"]
# Adam, so that each job's image moves well away from the shared start within 20 steps.
MIXED_TARGETS = ["target.relu=post,pre", "target.layer=block2,block3", "optimizer=adam", *SMALL,
                 "image.size=32", "steps=20"]


def featsweep(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m featsweep -m ARGS`` run from `cwd` (outputs under `cwd/sweep`)."""
    return run_module("featsweep", "-m", *args, f"hydra.sweep.dir={cwd / 'sweep'}", cwd=cwd)


def check_ok(proc: subprocess.CompletedProcess[str]) -> str:
    """Assert exit 0; return stdout + stderr (Hydra logs the launcher's lines to stdout)."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


def job_dirs(sweep: Path) -> dict[frozenset[str], Path]:
    """Job directories of a sweep keyed by their task overrides (as Hydra saved them)."""
    dirs = sorted((d for d in sweep.iterdir() if d.is_dir()), key=lambda d: int(d.name))
    jobs = {frozenset(OmegaConf.load(d / ".hydra" / "overrides.yaml")): d for d in dirs}
    assert len(jobs) == len(dirs), "two jobs with the same overrides"
    return jobs


def result(job: Path) -> dict[str, Any]:
    return json.loads((job / "result.json").read_text())


def trace(job: Path) -> np.ndarray:
    with open(job / "trace.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["step", "activation"]
    return np.array(rows[1:], dtype=np.float64)


def assert_same_images(a: Path, b: Path, n_jobs: int) -> None:
    """Job by job (matched by overrides), image.npy of sweeps `a` and `b` agree within 1e-5."""
    jobs_a, jobs_b = job_dirs(a), job_dirs(b)
    assert len(jobs_a) == n_jobs and set(jobs_a) == set(jobs_b)
    images = {}
    for key, dir_a in jobs_a.items():
        img_a, img_b = np.load(dir_a / "image.npy"), np.load(jobs_b[key] / "image.npy")
        assert img_a.shape == img_b.shape
        diff = float(np.abs(img_a - img_b).max())
        assert diff <= 1e-5, f"{sorted(key)}: batched and basic differ by {diff}"
        assert result(dir_a)["activation"] == pytest.approx(result(jobs_b[key])["activation"],
                                                            rel=1e-4, abs=1e-6)
        images[key] = img_a
    # The comparison means something only if the jobs' images differ from one another.
    imgs = list(images.values())
    for i in range(len(imgs)):
        for j in range(i + 1, len(imgs)):
            assert np.abs(imgs[i] - imgs[j]).max() > 1e-3, "two different jobs, same image"


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run torch in this process with one thread (as the subprocesses do), then restore."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def headline(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The README's sweep (6 jobs), batched: (sweep dir, log)."""
    cwd = tmp_path_factory.mktemp("headline_batched")
    out = check_ok(featsweep(cwd, *HEADLINE))
    return cwd / "sweep", out


# Makes writing image.npy fail for job 1 (as a full disk would), in the background writer.
FAILING_WRITE_MAIN = """
import featsweep.artifacts as artifacts
real = artifacts.atomic_write
def atomic_write(path, write, **kwargs):
    if path.name == "image.npy" and path.parent.name == "1":
        raise OSError(28, "No space left on device (injected for job 1)")
    return real(path, write, **kwargs)
artifacts.atomic_write = atomic_write
from featsweep.__main__ import main
main()
"""


def test_a_job_whose_files_cannot_be_written_fails_alone(tmp_path: Path) -> None:
    """Job 1's files fail in the background writer: job 1 is failed with that error (no
    result.json, so resume reruns it), the jobs before and after it are written in full, and
    the sweep ends with one message naming job 1."""
    script = tmp_path / "failing_write_main.py"
    script.write_text(FAILING_WRITE_MAIN)
    proc = subprocess.run([sys.executable, str(script), "-m", "seed=0,1,2", *SMALL,
                           "image.size=32", "steps=2", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                          cwd=tmp_path, env=cli_env(), capture_output=True, text=True,
                          timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-4000:]
    assert "Batched 3 jobs into 1 batch" in out
    assert "job #1: its files could not be written" in out
    assert "1 of 3 job(s) failed" in proc.stderr and "job #1" in proc.stderr
    assert "Traceback" not in proc.stderr
    sweep = tmp_path / "sweep"
    for ok in ("0", "2"):
        for name in JOB_FILES:
            assert (sweep / ok / name).is_file(), f"{ok}/{name} is missing"
        assert result(sweep / ok)["status"] == "ok"
    assert not (sweep / "1" / "result.json").exists()
    assert not (sweep / "1" / "image.npy").exists()
    assert not list((sweep / "1").glob(".*.tmp"))  # no temporary file left behind


@pytest.mark.slow
def test_headline_sweep_runs_as_one_batch(headline: tuple[Path, str]) -> None:
    sweep, out = headline
    assert "Batched 6 jobs into 1 batch" in out
    assert "Traceback" not in out
    dirs = sorted(d.name for d in sweep.iterdir() if d.is_dir())
    assert dirs == [str(i) for i in range(6)]
    expected_order = [(opt, k) for opt in ("sgd", "adam") for k in (3, 5, 7)]  # Hydra's order
    for i, (opt, k) in enumerate(expected_order):
        job = sweep / str(i)
        for name in (*JOB_FILES, ".hydra/config.yaml", ".hydra/hydra.yaml",
                     ".hydra/overrides.yaml"):
            assert (job / name).is_file(), f"{job / name} is missing"
        cfg = OmegaConf.load(job / ".hydra" / "config.yaml")
        assert (cfg.optimizer.name, cfg.blur.k) == (opt, k)
        assert f"optimizer={opt}" in OmegaConf.load(job / ".hydra" / "overrides.yaml")
        res = result(job)
        assert res["status"] == "ok" and res["error"] is None
        assert res["steps"] == 20 and res["batch_size"] == 6  # all six in one engine batch
        assert np.isfinite(res["activation"])
        img = np.load(job / "image.npy")
        assert img.dtype == np.float32 and img.shape == (64, 64, 3)
        assert np.isfinite(img).all() and img.min() >= 0.0 and img.max() <= 1.0  # clamped
        for png in ("image.png", "before_blur.png"):
            with Image.open(job / png) as im:
                assert im.size == (64, 64) and im.mode == "RGB"
        tr = trace(job)
        assert tr[:, 0].tolist() == list(range(21))  # step 0 (the start) .. 20 (final)
        assert tr[-1, 1] == pytest.approx(res["activation"], rel=1e-6)
    # The jobs really got their own hyperparameters: Adam moves the image further than SGD here.
    act = [result(sweep / str(i))["activation"] for i in range(6)]
    assert min(act[3:]) > max(act[:3])


@pytest.mark.slow
def test_headline_sweep_equals_basic_launcher(headline: tuple[Path, str], tmp_path: Path) -> None:
    out = check_ok(featsweep(tmp_path, *HEADLINE, "hydra/launcher=basic"))
    assert "Batched" not in out
    basic = tmp_path / "sweep"
    assert all(result(d)["batch_size"] == 1 for d in job_dirs(basic).values())
    assert_same_images(headline[0], basic, 6)


@pytest.mark.slow
def test_mixed_targets_in_one_batch_equal_basic_launcher(tmp_path: Path) -> None:
    (tmp_path / "batched").mkdir()
    (tmp_path / "basic").mkdir()
    out = check_ok(featsweep(tmp_path / "batched", *MIXED_TARGETS))
    assert "Batched 4 jobs into 1 batch" in out
    check_ok(featsweep(tmp_path / "basic", *MIXED_TARGETS, "hydra/launcher=basic"))
    batched = tmp_path / "batched" / "sweep"
    for job in job_dirs(batched).values():
        assert result(job)["batch_size"] == 4
    assert_same_images(batched, tmp_path / "basic" / "sweep", 4)


# Adam's first step moves every pixel by about lr; with lr = 1e38 and no clamp the network's
# sums overflow float32 at step 1. lr = 0.05 is an ordinary run.
DIVERGE = ["optimizer=adam", "optimizer.lr=0.05,1e38", "regularizer.clamp=false", *SMALL,
           "image.size=32", "steps=10"]


@pytest.mark.slow
def test_diverging_job_is_isolated(tmp_path: Path) -> None:
    out = check_ok(featsweep(tmp_path, *DIVERGE))  # a diverged job is an outcome, not a failure
    assert "Batched 2 jobs into 1 batch" in out
    dirs = sorted(d for d in (tmp_path / "sweep").iterdir() if d.is_dir())
    by_lr = {OmegaConf.load(d / ".hydra" / "config.yaml").optimizer.lr: d for d in dirs}
    assert sorted(by_lr) == [0.05, 1e38]
    good, bad = by_lr[0.05], by_lr[1e38]
    for job in (good, bad):
        for name in JOB_FILES:
            assert (job / name).is_file(), f"{job / name} is missing"

    res_bad = result(bad)
    assert res_bad["status"] == "diverged"
    assert isinstance(res_bad["diverged_at"], int) and 0 <= res_bad["diverged_at"] < 10
    assert res_bad["steps"] == res_bad["diverged_at"] < 10
    assert res_bad["activation"] is None or np.isfinite(res_bad["activation"])
    assert not np.isfinite(trace(bad)[-1, 1])  # the trace ends at the non-finite value

    res_good = result(good)
    assert res_good["status"] == "ok" and res_good["steps"] == 10 and res_good["batch_size"] == 2
    assert res_good["diverged_at"] is None
    assert np.isfinite(trace(good)[:, 1]).all()

    # The good job's image is what it would have been alone (its batch-mate went to NaN/inf).
    from featsweep.engine import run_batch
    from featsweep.spec import from_config

    spec = from_config(OmegaConf.load(good / ".hydra" / "config.yaml"))
    with one_torch_thread():
        (alone,) = run_batch([spec], emit=lambda _: None)
    assert alone.status == "ok"
    assert float(np.abs(alone.pixels - np.load(good / "image.npy")).max()) <= 1e-5


@pytest.mark.slow
def test_bad_value_in_a_sweep_stops_it_before_any_work(tmp_path: Path) -> None:
    proc = featsweep(tmp_path, "blur.k=2,3", *SMALL, "image.size=32", "steps=5")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    assert "blur.k=2" in proc.stderr and "odd" in proc.stderr
    assert "job #0" in proc.stderr and "job #1" not in proc.stderr  # the good job is not blamed
    assert "optimizing" not in proc.stdout  # the engine never started
    sweep = tmp_path / "sweep"
    assert not sweep.exists() or [p.name for p in sweep.iterdir()] in ([], ["multirun.yaml"])


@pytest.mark.slow
def test_bad_layer_in_a_sweep_stops_it_before_any_work(tmp_path: Path) -> None:
    """Errors that need the model (layer names) are also found for the whole sweep up front."""
    proc = featsweep(tmp_path, "target.layer=block3,nope", *SMALL, "image.size=32", "steps=5")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    assert "target.layer='nope'" in proc.stderr
    assert "optimizing" not in proc.stdout
    sweep = tmp_path / "sweep"
    assert not sweep.exists() or [p.name for p in sweep.iterdir()] in ([], ["multirun.yaml"])


# ------------------------------------------------------------------------ batching logic in-process


@pytest.fixture(scope="module")
def base_spec() -> Any:
    """A RunSpec from featsweep's real config, shrunk (tiny model, 32 px, CPU)."""
    from hydra import compose, initialize_config_dir

    import featsweep
    from featsweep.spec import from_config

    conf = Path(featsweep.__file__).resolve().parent / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("config", overrides=[*SMALL, "image.size=32", "steps=5"])
    return from_config(cfg)


def make_jobs(base_spec: Any, n: int, **changes: Any) -> list[plan.Job]:
    """n jobs whose specs differ by seed (seed == job index)."""
    return [plan.Job(i, [f"seed={i}"], OmegaConf.create({}),
                       dataclasses.replace(base_spec, seed=i, **changes)) for i in range(n)]


def test_groups_by_batch_key_in_first_seen_order_and_max_batch(base_spec: Any) -> None:
    small = make_jobs(base_spec, 5)
    big = [dataclasses.replace(j, idx=j.idx + 5,
                               spec=dataclasses.replace(j.spec, image=dataclasses.replace(
                                   j.spec.image, size=48))) for j in make_jobs(base_spec, 2)]
    jobs = [small[0], big[0], small[1], small[2], big[1], small[3], small[4]]
    groups = plan.batch_groups(jobs, max_batch=2)
    assert [[j.idx for j in g] for g in groups] == [[0, 1], [2, 3], [4], [5, 6]]
    assert [[j.idx for j in g] for g in plan.batch_groups(jobs, max_batch=64)] == [[0, 1, 2, 3, 4],
                                                                                [5, 6]]
    # As few batches as max_batch allows, of near-equal sizes (not 4 + 1).
    assert [[j.idx for j in g] for g in plan.batch_groups(jobs, max_batch=4)] == [[0, 1, 2], [3, 4],
                                                                               [5, 6]]


class FakeEngine:
    """Stands in for featsweep.engine.run_batch: records batch sizes, fails on demand."""

    def __init__(self, fail: Any) -> None:
        self.fail = fail  # (list of specs) -> exception to raise, or None
        self.calls: list[list[int]] = []

    def __call__(self, specs: Any, **_: Any) -> list[str]:
        self.calls.append([s.seed for s in specs])
        exc = self.fail(specs)
        if exc is not None:
            raise exc
        return [f"outcome of seed {s.seed}" for s in specs]


def test_a_deterministic_error_costs_one_engine_call(base_spec: Any,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Only out-of-memory is retried: any other error would come back on a retry, so a 16-job
    batch that raises ValueError costs ONE engine call and its 16 jobs fail with that error."""
    boom = ValueError("boom in job 2")
    engine = FakeEngine(lambda specs: boom if any(s.seed == 2 for s in specs) else None)
    monkeypatch.setattr("featsweep.engine.run_batch", engine)
    jobs = make_jobs(base_spec, 16)
    run_local.optimize(jobs)
    assert engine.calls == [list(range(16))]  # one call, no halving
    assert all(j.error is boom and j.outcome is None for j in jobs)


def test_a_failed_batch_does_not_stop_the_next_one(base_spec: Any,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    engine = FakeEngine(lambda specs: ValueError("bad") if specs[0].seed == 0 else None)
    monkeypatch.setattr("featsweep.engine.run_batch", engine)
    first, second = make_jobs(base_spec, 4)[:2], make_jobs(base_spec, 4)[2:]
    run_local.optimize(first)
    run_local.optimize(second)
    assert [j.error is not None for j in first + second] == [True, True, False, False]
    assert [j.outcome for j in second] == ["outcome of seed 2", "outcome of seed 3"]


def test_out_of_memory_split_keeps_a_diversity_group_whole(base_spec: Any,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(specs: Any) -> Exception | None:
        return RuntimeError("CUDA out of memory.") if len(specs) > 3 else None

    engine = FakeEngine(fail)
    monkeypatch.setattr("featsweep.engine.run_batch", engine)
    jobs = make_jobs(base_spec, 5)
    grouped = {1: "g", 2: "g", 3: "g"}  # jobs 1-3 share a diversity group
    monkeypatch.setattr(plan, "_diversity_group", lambda job: grouped.get(job.idx))
    run_local.optimize(jobs)
    assert engine.calls[0] == [0, 1, 2, 3, 4]
    for call in engine.calls[1:]:  # 1, 2 and 3 are never cut apart
        assert {1, 2, 3} <= set(call) or not {1, 2, 3} & set(call), engine.calls
    assert all(j.error is None for j in jobs)


def test_out_of_memory_batches_are_split_in_halves(base_spec: Any,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(specs: Any) -> Exception | None:
        return RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB") if len(specs) > 2 \
            else None

    engine = FakeEngine(fail)
    monkeypatch.setattr("featsweep.engine.run_batch", engine)
    jobs = make_jobs(base_spec, 5)
    run_local.optimize(jobs)
    assert [j.error for j in jobs] == [None] * 5
    assert [j.outcome for j in jobs] == [f"outcome of seed {i}" for i in range(5)]
    assert engine.calls == [[0, 1, 2, 3, 4], [0, 1, 2], [0, 1], [2], [3, 4]]


def test_torch_out_of_memory_error_is_recognised() -> None:
    import torch

    assert run_local.is_oom(torch.OutOfMemoryError("CUDA out of memory."))
    assert run_local.is_oom(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried "
                                      "... out of memory"))
    assert not run_local.is_oom(ValueError("boom"))
