"""Past one machine: featsweep through submitit (SLURM in production, ``submitit_local`` here).

Two modes, both run end to end as a user runs them (``python -m featsweep -m ...``):

1. Hydra's own submitit launcher, one featsweep job per task (``hydra/launcher=submitit_local``).
2. featsweep's batched launcher with each batch as ONE submitit task
   (``hydra/launcher=batched hydra.launcher.backend=submitit_local``).

Either way a 4-job sweep gives 4 ok job directories that ``featsweep.analysis.collect`` reads
like any other. There is no SLURM here: the SLURM presets are checked by composing them and by
the sbatch script submitit would submit (a stand-in ``srun`` on PATH satisfies submitit's check).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import featsweep
from featsweep.artifacts import FILES, read_result
from featsweep.errors import ConfigError
from hydra_plugins.featsweep_batched_launcher import _plan as plan, _run_submitit as run_submitit
from hydra_plugins.featsweep_batched_launcher.batched_launcher import BatchedLauncher

from _cli import run_module

CONF = str(Path(featsweep.__file__).resolve().parent / "conf")
SWEEP = ["model=tiny", "device=cpu", "image.size=32", "steps=5", "optimizer=adam",
         "seed=0,1", "optimizer.weight_decay=0,0.1"]


def featsweep_m(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_module("featsweep", "-m", *args, f"hydra.sweep.dir={cwd / 'sweep'}", cwd=cwd)


def check_four_ok_jobs(sweep: Path) -> list[dict[str, Any]]:
    """4 job dirs 0..3, every file there, status ok; analysis collects them like any sweep."""
    from featsweep.analysis import collect

    dirs = sorted((d for d in sweep.iterdir() if d.is_dir() and not d.name.startswith(".")),
                  key=lambda d: d.name)
    assert [d.name for d in dirs] == ["0", "1", "2", "3"]
    results = []
    for d in dirs:
        for name in FILES:
            assert (d / name).is_file(), f"{d / name} is missing"
        res = read_result(d)
        assert res is not None and res["status"] == "ok" and res["steps"] == 5, res
        assert np.load(d / "image.npy").shape == (32, 32, 3)
        results.append(res)
    df = collect(sweep)
    assert len(df) == 4 and df["status"].tolist() == ["ok"] * 4
    assert df["job.num"].tolist() == [0, 1, 2, 3]
    assert sorted(zip(df["seed"], df["optimizer.weight_decay"])) == [(0, 0.0), (0, 0.1),
                                                                     (1, 0.0), (1, 0.1)]
    return results


@pytest.mark.slow
def test_hydra_submitit_local_runs_one_job_per_task(tmp_path: Path) -> None:
    proc = featsweep_m(tmp_path, *SWEEP, "hydra/launcher=submitit_local")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "Traceback" not in out
    results = check_four_ok_jobs(tmp_path / "sweep")
    assert [r["batch_size"] for r in results] == [1] * 4
    tasks = [d for d in (tmp_path / "sweep" / ".submitit").iterdir() if d.name != "%j"]
    assert len(tasks) == 4  # one submitit task per job


@pytest.mark.slow
def test_batched_launcher_submits_each_batch_as_one_task(tmp_path: Path) -> None:
    proc = featsweep_m(tmp_path, *SWEEP, "hydra/launcher=batched",
                       "hydra.launcher.backend=submitit_local", "hydra.launcher.max_batch=2")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "Traceback" not in out
    assert "Batched 4 jobs into 2 batch(es) of at most 2, each as one submitit_local task" in out
    assert "Submitted 2 submitit_local task(s)" in out
    results = check_four_ok_jobs(tmp_path / "sweep")
    assert [r["batch_size"] for r in results] == [2] * 4  # each task ran its batch as one
    tasks = [d for d in (tmp_path / "sweep" / ".submitit").iterdir() if d.name != "%j"]
    assert len(tasks) == 2
    # Inside the task each job went through Hydra's run_job: its .hydra files and log are there.
    for d in (tmp_path / "sweep" / str(i) for i in range(4)):
        assert (d / ".hydra" / "overrides.yaml").is_file() and (d / "featsweep.log").is_file()
        hydra = OmegaConf.load(d / ".hydra" / "hydra.yaml")
        assert str(hydra.hydra.job.num) == d.name


# Composing sets Hydra's global version base (1.3); restore Hydra's singletons after each test so
# that later in-process Hydra suites (tests/test_launcher.py) still see their defaults.
pytestmark = pytest.mark.usefixtures("hydra_restore_singletons")


# ------------------------------------------------------------------------ presets, no cluster


def launcher_config(*overrides: str) -> Any:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    return cfg.hydra.launcher


@pytest.mark.parametrize("preset, target, backend", [
    ("batched", "BatchedLauncher", "local"),
    ("batched_submitit_local", "BatchedLauncher", "submitit_local"),
    ("batched_slurm", "BatchedLauncher", "submitit_slurm"),
    ("submitit_local", "LocalLauncher", None),
    ("submitit_slurm_gpu", "SlurmLauncher", None),
])
def test_launcher_presets_compose(preset: str, target: str, backend: str | None) -> None:
    cfg = launcher_config(f"hydra/launcher={preset}")
    assert cfg._target_.endswith(target)
    if backend is not None:
        assert cfg.backend == backend
    if "slurm" in preset:
        assert cfg.partition is None  # required; see test_batched_slurm_requires_a_partition
        assert cfg.gpus_per_task == 1 and cfg.timeout_min >= 60


def make_launcher(*overrides: str) -> BatchedLauncher:
    cfg = launcher_config(*overrides)
    params = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(params, dict)
    params.pop("_target_")
    params["submitit_folder"] = "/tmp/featsweep-test/%j"
    params["name"] = "featsweep"
    return BatchedLauncher(**params)


def test_batched_slurm_requires_a_partition() -> None:
    launcher = make_launcher("hydra/launcher=batched_slurm")
    with pytest.raises(ConfigError, match="hydra.launcher.partition=NAME"):
        plan.check_settings(launcher)


def test_batched_slurm_settings_reach_sbatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The preset's settings become the sbatch options of each batch's task: one node, one task,
    one GPU, the partition and the time limit."""
    fake_srun = tmp_path / "srun"
    fake_srun.write_text("#!/bin/sh\nexit 0\n")
    fake_srun.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    launcher = make_launcher("hydra/launcher=batched_slurm", "hydra.launcher.partition=gpu",
                             "hydra.launcher.max_num_timeout=1",
                             "+hydra.launcher.additional_parameters.mail-type=END")
    plan.check_settings(launcher)
    executor = run_submitit.make_executor(launcher)
    script = executor._executor._make_submission_file_text("python -m featsweep_task", "uid")
    for option in ("--partition=gpu", "--gpus-per-task=1", "--cpus-per-task=8", "--mem=64GB",
                   "--time=240", "--nodes=1", "--ntasks-per-node=1", "--signal=USR2@120",
                   "--mail-type=END", "--job-name=featsweep"):
        assert f"#SBATCH {option}\n" in script, option
    assert executor._executor.max_num_timeout == 1
    assert executor._executor.parameters["array_parallelism"] == 256


def test_local_backend_takes_only_what_a_local_task_understands() -> None:
    launcher = make_launcher("hydra/launcher=batched_submitit_local",
                             "hydra.launcher.partition=ignored", "hydra.launcher.timeout_min=7")
    plan.check_settings(launcher)
    params = run_submitit.make_executor(launcher)._executor.parameters
    assert params["timeout_min"] == 7 and params["tasks_per_node"] == 1
    assert "partition" not in params


@pytest.mark.slow
def test_batched_task_requeues_itself_at_the_pre_timeout_signal(tmp_path: Path) -> None:
    """SLURM sends USR2 `signal_delay_s` before a task's time limit. Sent here to a running
    submitit_local batch: the task writes both jobs as interrupted with their state, asks
    submitit to requeue it, and the requeued task continues them to the end: the images equal an
    uninterrupted run's of the same batch, bit for bit."""
    import signal
    import sys
    import time

    from _cli import cli_env

    args = ["model=tiny", "device=cpu", "image.size=32", "optimizer=adam", "steps=1500",
            "log_every=50", "seed=0,1", "hydra.launcher.max_batch=2"]
    sweep = tmp_path / "sweep"
    proc = subprocess.Popen([sys.executable, "-m", "featsweep", "-m", *args,
                             "hydra.launcher.backend=submitit_local", f"hydra.sweep.dir={sweep}"],
                            cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    pid = None
    while pid is None:
        assert proc.poll() is None and time.monotonic() < deadline, "the task never got going"
        for log in sweep.glob(".submitit/*/*_log.out"):
            text = log.read_text()
            found = [line for line in text.splitlines() if "(PID " in line]
            if found and "step 200/1500" in text:
                pid = int(found[0].split("(PID ")[1].split(")")[0])
        time.sleep(0.2)
    os.kill(pid, signal.SIGUSR2)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, (out + err)[-4000:]
    logs = "".join(p.read_text() for p in sweep.glob(".submitit/*/*_log.*"))
    assert "SIGUSR2 before the time limit: jobs written, asking submitit to requeue" in logs
    assert "(state)" in logs and "continuing from step" in logs  # the requeued task resumed
    reference = tmp_path / "reference"
    done = run_module("featsweep", "-m", *args, f"hydra.sweep.dir={reference}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    for i in (0, 1):
        got, want = read_result(sweep / str(i)), read_result(reference / str(i))
        assert got is not None and want is not None
        assert got["status"] == "ok" and got["steps"] == 1500 and got["batch_size"] == 2
        assert got["activation"] == want["activation"]
        assert np.array_equal(np.load(sweep / str(i) / "image.npy"),
                              np.load(reference / str(i) / "image.npy"))
        assert not (sweep / str(i) / "state.pt").exists()


@pytest.mark.slow
def test_plain_submitit_job_requeues_and_continues_at_the_pre_timeout_signal(tmp_path: Path
                                                                             ) -> None:
    """Hydra's own submitit launcher (one job per task): featsweep's task handles USR2 the same
    way: written as interrupted with its state, requeued, continued from that step, and equal
    to an uninterrupted run of the job."""
    import signal
    import sys
    import time

    from _cli import cli_env

    args = ["model=tiny", "device=cpu", "image.size=32", "optimizer=adam", "steps=800",
            "log_every=50", "seed=0"]
    sweep = tmp_path / "sweep"
    proc = subprocess.Popen([sys.executable, "-m", "featsweep", "-m", *args,
                             "hydra/launcher=submitit_local", f"hydra.sweep.dir={sweep}"],
                            cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not any("step 150/800" in log.read_text()
                  for log in sweep.glob(".submitit/*/*_log.out")):
        assert proc.poll() is None and time.monotonic() < deadline, "the task never got going"
        time.sleep(0.2)
    tasks = []
    for pid in filter(str.isdigit, os.listdir("/proc")):  # the task process (not its controller)
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_text()
        except OSError:
            continue
        if "submitit.core._submit" in cmd and str(sweep) in cmd:
            tasks.append(int(pid))
    assert len(tasks) == 1, tasks
    os.kill(tasks[0], signal.SIGUSR2)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    logs = "".join(p.read_text() for p in sweep.glob(".submitit/*/*_log.out"))
    assert "asking submitit to requeue this task" in logs and "Requeued job" in logs
    assert "continues from its saved state (interrupted after" in logs
    assert "continuing from step" in logs
    reference = run_module("featsweep", *args, "hydra.run.dir=ref", cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr[-3000:]
    got, want = read_result(sweep / "0"), read_result(tmp_path / "ref")
    assert got is not None and want is not None
    assert got["status"] == "ok" and got["steps"] == 800 and got["activation"] == want["activation"]
    assert np.array_equal(np.load(sweep / "0" / "image.npy"), np.load(tmp_path / "ref" / "image.npy"))
