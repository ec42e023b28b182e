"""End-to-end tests of the command line: `python -m featsweep` and `python -m featsweep.layers`.

Each test starts a fresh Python (≈3-5 s for torch + Hydra); errors must come back as one clear
message on stderr, a non-zero exit and no traceback.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from featsweep.metrics import image_stats

from _cli import cli_env, run_module

FILES = ("image.png", "before_blur.png", "image.npy", "trace.csv", "result.json")
FAST = ("model=tiny", "image.size=32", "steps=5", "device=cpu")


def cli(tmp_path: Path, *args: str, module: str = "featsweep", timeout: float = 300,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # torch keeps its default thread count here: the default run is the user's acceptance run.
    full_env = cli_env(one_thread=False)
    full_env.update(env or {})
    return run_module(module, *args, cwd=tmp_path, timeout=timeout, env=full_env)


def assert_clean_error(proc: subprocess.CompletedProcess[str], *fragments: str,
                       code: int = 1) -> None:
    """Exit status `code` (1; featsweep.layers' usage errors: 2), the fragments on stderr, and stderr is ONE paragraph: no traceback, no
    Hydra wrapper ("Error executing job with overrides", the HYDRA_FULL_ERROR hint)."""
    assert proc.returncode == code, proc.stdout + proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, f"{fragment!r} not in stderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    assert "Traceback" not in proc.stdout
    assert "Error executing job" not in proc.stderr and "HYDRA_FULL_ERROR" not in proc.stderr
    assert "\n\n" not in proc.stderr.strip(), proc.stderr  # one paragraph


# (id, overrides, fragments expected on stderr)
CLI_ERRORS = [
    ("unknown layer", ["target.layer=blok3"],
     ["target.layer='blok3'", "close names: block3", "python -m featsweep.layers model=tiny"]),
    ("channel out of range", ["target.channel=64"],
     ["target.channel=64", "block3 has 64 channels", "0..63"]),
    ("lr zero", ["optimizer.lr=0"], ["optimizer.lr=0.0", "must be > 0"]),
    ("lr negative", ["optimizer.lr=-0.1"], ["optimizer.lr=-0.1", "must be > 0"]),
    ("steps zero", ["steps=0"], ["steps=0", "must be >= 1"]),
    ("even kernel", ["blur.k=4"], ["blur.k=4", "odd and >= 1"]),
    ("unknown model name", ["model.name=vgg19"], ["model.name='vgg19'", "did you mean 'vgg16'"]),
    ("unknown model group", ["model=vgg19"], ["Could not find 'model/vgg19'", "vgg16"]),
    ("pre without relu", ["model=efficientnet_lite0", "target.layer=_blocks.10",
                          "target.relu=pre"], ["target.relu='pre'", "_blocks.10", "ReLU"]),
]


@pytest.mark.parametrize("overrides, fragments", [(o, f) for _, o, f in CLI_ERRORS],
                         ids=[name for name, _, _ in CLI_ERRORS])
def test_cli_error(tmp_path: Path, overrides: list[str], fragments: list[str]) -> None:
    proc = cli(tmp_path, *FAST, *overrides, "hydra.run.dir=out")
    assert_clean_error(proc, *fragments)
    if (tmp_path / "out").exists():  # Hydra made the run dir: the run says it never started
        result = json.loads((tmp_path / "out" / "result.json").read_text())
        assert result["status"] == "not_started" and fragments[0] in result["error"]
        assert not (tmp_path / "out" / "image.npy").exists()  # nothing ran


def test_cli_missing_weights(tmp_path: Path) -> None:
    home = tmp_path / "empty_torch_home"
    proc = cli(tmp_path, "model=inception_v3", "device=cpu", "hydra.run.dir=out",
               env={"TORCH_HOME": str(home)})
    assert_clean_error(proc, "model.weights='pretrained'", "no ImageNet weights for inception_v3",
                       str(home / "hub" / "checkpoints"), "model.weights=random")
    assert not (home / "hub" / "checkpoints").exists()  # nothing was downloaded


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cli_cuda_without_gpu(tmp_path: Path) -> None:
    proc = cli(tmp_path, "model=tiny", "image.size=32", "steps=5", "device=cuda",
               "hydra.run.dir=out")
    assert_clean_error(proc, "device='cuda'", "no CUDA device", "device=cpu or auto")


def test_cli_sweep_error_stops_before_any_job(tmp_path: Path) -> None:
    """The same error in 3 jobs is printed once, with the job count."""
    proc = cli(tmp_path, "-m", *FAST, "optimizer.lr=0.1,0.2,0.3", "target.channel=99",
               "hydra.sweep.dir=multirun")
    assert_clean_error(proc, "the sweep was not started: 3 jobs (#0 #1 #2):", "target.channel=99",
                       "block3 has 64 channels")
    assert proc.stderr.count("target.channel=99") == 1
    assert not list(tmp_path.rglob("result.json"))


@pytest.mark.parametrize("args, code, fragments", [
    (["--help"], 0, ["featsweep"]),
    (["--cfg", "job", "-m", "seed=0,1"], 2, ["--cfg shows one run's configuration",
                                              "use --dry-run"]),
    (["--info", "-m", "seed=0,1"], 2, ["--info shows one run's configuration", "use --dry-run"]),
])
def test_cli_flags(tmp_path: Path, args: list[str], code: int, fragments: list[str]) -> None:
    proc = cli(tmp_path, *args)
    assert proc.returncode == code, proc.stdout + proc.stderr
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out
    for fragment in fragments:
        assert fragment in out


def test_cli_dry_run_lists_jobs_and_batches_without_loading_a_model(tmp_path: Path) -> None:
    """--dry-run: each job's overrides and the batches, with a model whose weights are not here
    (so nothing may load it), and no directory is left behind."""
    home = tmp_path / "empty_torch_home"
    proc = cli(tmp_path, "--dry-run", "model=inception_v3", "device=cpu", "seed=0,1,2",
               "hydra.launcher.max_batch=2", "hydra.sweep.dir=sweep",
               env={"TORCH_HOME": str(home)})
    assert proc.returncode == 0, proc.stderr
    assert "featsweep dry run: 3 job(s) into 2 batch(es) of at most 2, run here" in proc.stdout
    for i in range(3):
        assert f"  #{i}: model=inception_v3 device=cpu seed={i}" in proc.stdout
    assert "batch 1: #0-#1 (2 images); inception_v3 299px" in proc.stdout
    assert "batch 2: #2;" in proc.stdout
    assert not (tmp_path / "sweep").exists() and not home.exists()


def test_cli_single_run(tmp_path: Path) -> None:
    proc = cli(tmp_path, *FAST, "optimizer=adam", "optimizer.lr=0.05", "hydra.run.dir=out")
    assert proc.returncode == 0, proc.stderr
    job = tmp_path / "out"
    for name in FILES:
        assert (job / name).is_file(), name
    result = json.loads((job / "result.json").read_text())
    assert result["status"] == "ok" and result["steps"] == 5 and result["device"] == "cpu"
    assert len((job / "trace.csv").read_text().splitlines()) == 1 + 6  # header + steps + 1
    img = np.load(job / "image.npy")
    assert img.shape == (32, 32, 3) and img.dtype == np.float32
    assert (job / ".hydra" / "config.yaml").is_file()


def test_cli_readme_sweep_six_jobs(tmp_path: Path) -> None:
    """The README's sweep, shrunk: 6 job directories, each with all five files."""
    proc = cli(tmp_path, "-m", "optimizer=sgd,adam", "blur.k=3,5,7", "model=tiny",
               "image.size=64", "steps=20", "device=cpu", "hydra.sweep.dir=multirun")
    assert proc.returncode == 0, proc.stderr
    jobs = sorted(p for p in (tmp_path / "multirun").iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == [str(i) for i in range(6)]
    seen = set()
    for job in jobs:
        for name in FILES:
            assert (job / name).is_file(), f"{job.name}/{name}"
        assert json.loads((job / "result.json").read_text())["status"] == "ok"
        overrides = (job / ".hydra" / "overrides.yaml").read_text()
        seen.add(tuple(sorted(line for line in overrides.splitlines()
                              if "optimizer=" in line or "blur.k=" in line)))
    assert len(seen) == 6


class TestLayersCommand:
    def test_tiny(self, tmp_path: Path) -> None:
        proc = cli(tmp_path, "model=tiny", module="featsweep.layers")
        assert proc.returncode == 0, proc.stderr
        rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()[2:]}
        assert rows["block3"][2] == "64"
        assert rows["block3"][3] == "16x16"  # 64 px default, strides 2, 2, 1
        assert rows["block3"][-1] == "pre"  # ends in a ReLU
        assert "block3.0" in rows and rows["block3.0"][-1] != "pre"  # a bare conv
        assert "head" not in rows  # not a (C, H, W) map

    def test_image_size(self, tmp_path: Path) -> None:
        proc = cli(tmp_path, "model=tiny", "image.size=32", module="featsweep.layers")
        assert proc.returncode == 0, proc.stderr
        assert any(line.split()[:4] == ["block3", "Sequential", "64", "8x8"]
                   for line in proc.stdout.splitlines())

    def test_help(self, tmp_path: Path) -> None:
        proc = cli(tmp_path, "--help", module="featsweep.layers")
        assert proc.returncode == 0 and "usage: python -m featsweep.layers" in proc.stdout

    @pytest.mark.parametrize("args, fragment", [
        (["model=vgg19"], "model='vgg19'"),
        (["--bogus"], "unknown argument '--bogus'"),
    ])
    def test_bad_arguments(self, tmp_path: Path, args: list[str], fragment: str) -> None:
        proc = cli(tmp_path, *args, module="featsweep.layers")
        assert_clean_error(proc, fragment, code=2)


# ---------------------------------------------------------------- the default run (acceptance)


@pytest.fixture(scope="module")
def default_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`python -m featsweep` with no overrides (only the output directory), on the CPU."""
    cwd = tmp_path_factory.mktemp("default_run")
    env = {"CUDA_VISIBLE_DEVICES": ""}  # the acceptance is about the CPU
    proc = cli(cwd, "hydra.run.dir=out", timeout=1200, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return cwd / "out"


def start_pixels(size: int, seed: int = 0) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, size, size, generator=g).permute(1, 2, 0).numpy()


@pytest.mark.slow
def test_default_run_finishes_with_high_activation(default_run: Path) -> None:
    for name in FILES:
        assert (default_run / name).is_file(), name
    result = json.loads((default_run / "result.json").read_text())
    assert result["status"] == "ok"
    assert result["device"] == "cpu"
    assert result["layer"] == "_blocks.10" and result["image_size"] == 224
    start, final = result["activation_start"], result["activation"]
    assert final >= 5 * abs(start) + 5, (start, final)
    trace = np.loadtxt(default_run / "trace.csv", delimiter=",", skiprows=1)
    assert trace[0, 1] == pytest.approx(start) and trace[-1, 1] == pytest.approx(final)


@pytest.mark.slow
def test_default_run_image_is_structured(default_run: Path) -> None:
    """'Visibly structured': far from the start noise, and no longer white (power falls with
    frequency). White noise has spectral_slope ≈ 0 and hf_energy ≈ 0.8."""
    pixels = np.load(default_run / "image.npy")
    display = np.asarray(Image.open(default_run / "image.png"), dtype=np.float64) / 255
    start = start_pixels(pixels.shape[0])
    noise = image_stats(start)
    stats = image_stats(display)
    assert noise["spectral_slope"] > -0.5 and noise["hf_energy"] > 0.7  # the baseline
    assert np.abs(pixels - start).mean() > 0.05
    assert stats["spectral_slope"] < -1.5, stats
    assert stats["hf_energy"] < 0.4, stats
