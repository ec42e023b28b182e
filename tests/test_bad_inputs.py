"""Bad input at every door: the app, the launcher and the analysis CLI, each run as a user runs it
(a subprocess), must reject a mistake with a clear message and no traceback.

One table row per mistake: the command, the message fragment it must print, and the exit status
(non-zero; the analysis CLI exits 0 for a corrupted job file because it reports and skips that
job and analyses the rest; then the fragment is looked for in the report it wrote).

Where the message is Hydra's own (override syntax, unknown group option, unknown key, a
launcher value of the wrong type), the row pins Hydra's text. One of them cannot be improved in
featsweep's layer: for ``blur.k=[`` Hydra 1.3 prints the parser's "no viable alternative at input
'['" without naming the override (the parse fails before featsweep code runs); the row documents
that. Rows that need the model (layer, channel) load the tiny test model (a few seconds).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from _cli import run_module

SMALL = ["model=tiny", "device=cpu", "image.size=32", "steps=2"]
VEC3 = Path(__file__).resolve().parent / "_vec3.npy"  # a 3-vector: the wrong length for block3


@dataclass(frozen=True)
class Row:
    door: str  # "app" (one run), "sweep" (-m, through the launcher) or "analysis"
    args: tuple[str, ...]  # command-line arguments after the door's fixed part
    fragment: str  # must appear in stderr (or in analysis/report.md when rc == 0)
    rc: int | None = None  # expected exit status; None = any non-zero
    setup: Callable[[Path, Path], None] | None = None  # (tmp dir, a finished sweep) -> None


# ------------------------------------------------------------------ analysis-door preparations


def copy_sweep(src: Path, dst: Path) -> None:
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("analysis", ".featsweep_metrics.json"))


def corrupt_result(tmp: Path, sweep: Path) -> None:
    copy_sweep(sweep, tmp / "sweep")
    (tmp / "sweep" / "1" / "result.json").write_text('{"status": "ok", "activ')


def corrupt_image(tmp: Path, sweep: Path) -> None:
    copy_sweep(sweep, tmp / "sweep")
    npy = tmp / "sweep" / "0" / "image.npy"
    npy.write_bytes(npy.read_bytes()[:40])


def empty_dir(tmp: Path, sweep: Path) -> None:
    (tmp / "sweep" / "notes").mkdir(parents=True)


def claims(factor: str, metric: str) -> Callable[[Path, Path], None]:
    def setup(tmp: Path, sweep: Path) -> None:
        copy_sweep(sweep, tmp / "sweep")
        (tmp / "claims.yaml").write_text(
            "claims:\n"
            f"  - name: \"a claim\"\n    factor: {factor}\n    metric: {metric}\n"
            "    direction: increase\n")
    return setup


def not_yaml(tmp: Path, sweep: Path) -> None:
    copy_sweep(sweep, tmp / "sweep")
    (tmp / "claims.yaml").write_text("claims: [\n  - name: {{\n")


CLAIMS = ("--claims", "claims.yaml")

ROWS = {
    # --- the app (one run): Hydra's override parser and config loader
    "empty value": Row("app", ("optimizer.lr=",), "optimizer.lr='': must be a number"),
    "unclosed list (Hydra; names no override)": Row("app", ("blur.k=[",),
                                                    "no viable alternative at input '['"),
    "unknown group option": Row("app", ("optimizer=rmsprop",),
                                "Could not find 'optimizer/rmsprop'"),
    "unknown model": Row("app", ("model=alexnet",), "Could not find 'model/alexnet'"),
    "unknown key without +": Row("app", ("foo=1",), "Could not override 'foo'"),
    # --- the app: featsweep's validation (spec.from_config), before torch is loaded
    "steps not a number": Row("app", ("steps=ten",), "steps='ten': must be an integer"),
    "clamp not a bool": Row("app", ("regularizer.clamp=maybe",),
                            "regularizer.clamp='maybe': must be true or false"),
    "lr zero": Row("app", ("optimizer.lr=0",), "optimizer.lr=0.0: must be > 0"),
    "lr negative": Row("app", ("optimizer.lr=-1",), "optimizer.lr=-1.0: must be > 0"),
    "even blur kernel": Row("app", ("blur.k=4",), "blur.k=4: the kernel side must be odd"),
    "momentum out of range": Row("app", ("optimizer.momentum=1.5",),
                                 "optimizer.momentum=1.5: must be >= 0 and < 1"),
    "betas not a pair": Row("app", ("optimizer.betas=[0.9]",),
                            "must be a list of two numbers"),
    "relu unknown": Row("app", ("target.relu=middle",), "allowed values are post, pre"),
    "image too small": Row("app", ("image.size=8",), "tiny needs images of at least 16 px"),
    "resume not a bool": Row("app", ("resume=maybe",), "resume='maybe': must be true or false"),
    "optimized_metric unknown": Row("app", ("optimized_metric=display.sharpnes",),
                                    "optimized_metric='display.sharpnes': unknown metric "
                                    "'display.sharpnes'; did you mean 'display.sharpness'?"),
    "optimized_metric vs directions": Row(
        "sweep", ("hydra/sweeper=optuna", "hydra.sweeper.n_trials=1",
                  "optimized_metric=[activation,raw.contrast]", "seed=choice(0,1)"),
        "optimized_metric names 2 metric(s) (activation, raw.contrast) but the sweeper has 1 "
        "direction(s)"),
    "weights file missing": Row("app", ("model=resnet50", "model.weights=/no/such/file.pt"),
                                "model.weights='/no/such/file.pt': no such file"),
    # --- the app: networks named by config (README: Your own model)
    "custom model without normalization": Row("app", ("model=custom",
                                                      "model._target_=torch.nn.Identity",
                                                      "target.layer=x"),
                                              "model.mean=None: model=custom needs the input "
                                              "normalization"),
    "unknown torchvision arch": Row("app", ("model=torchvision", "model.arch=resnet81",
                                            "target.layer=layer1"),
                                    "model.arch='resnet81': not a torchvision classifier (close "
                                    "names: resnet18"),
    "custom target that does not import": Row("app", ("model=custom", "model._target_=nopkg.net",
                                                      "model.mean=[0.5,0.5,0.5]",
                                                      "model.std=[0.5,0.5,0.5]", "target.layer=x"),
                                              "model._target_='nopkg.net': cannot import it"),
    # --- the app: the toolkit's keys (parameterizations, transforms, penalties, objectives)
    "unknown key (typo, + included)": Row("app", ("+optimzer.lr=0.1",),
                                          "unknown config key optimzer.lr=0.1: featsweep does "
                                          "not read it"),
    "fft in normalized space": Row("app", ("param=fft", "image.space=normalized"),
                                   "image.space='normalized': param=fft builds the image in "
                                   "pixel space"),
    "jitter not smaller than the image": Row("app", ("transform.jitter=32",),
                                             "transform.jitter=32: the jitter crop must be smaller "
                                             "than image.size (32)"),
    "jitter crops leaving no image": Row("app", ("transform.jitter=20", "transform.jitter_final=20"),
                                         "transform.jitter=20: the two jitter crops (transform.jitter "
                                         "+ transform.jitter_final = 40 px) must leave the model an "
                                         "image: image.size + 2 × transform.pad − both = -8 px"),
    "empty rotate list": Row("app", ("transform.rotate=[]",),
                             "transform.rotate=[]: must list at least one value"),
    "negative tv weight": Row("app", ("regularizer.tv=-0.1",), "regularizer.tv=-0.1: must be >= 0"),
    "unknown param option (Hydra)": Row("app", ("param=fourier",),
                                        "Could not find 'param/fourier'"),
    "direction of the wrong length": Row("app", ("target.kind=direction",
                                                 f"target.direction={VEC3}"),
                                         "has 64 channels: give a (64,) vector"),
    "neuron outside the layer": Row("app", ("target.kind=neuron", "target.x=99"),
                                    "target.x=99: layer block3 is 8×8"),
    "diversity group of one job": Row("sweep", ("target.diversity=1", "target.diversity_group=a"),
                                      "target.diversity_group='a': only one job (#0)"),
    # --- the app: checks that need the model
    "unknown layer": Row("app", ("target.layer=nope",),
                         "target.layer='nope': tiny has no such layer"),
    "channel out of range": Row("app", ("target.channel=999",),
                                "target.channel=999: layer block3 has 64 channels"),
    "cuda absent": Row("app", ("device=cuda",), "device='cuda': no CUDA device is visible"),
    # --- the launcher (-m)
    "bad channel in one job of a sweep": Row("sweep", ("target.channel=0,999",),
                                             "target.channel=999): bad config value "
                                             "target.channel=999: layer block3 has 64 channels"),
    "max_batch zero": Row("sweep", ("hydra.launcher.max_batch=0",),
                          "hydra.launcher.max_batch=0: must be an integer >= 1"),
    "max_batch not a number (Hydra)": Row("sweep", ("hydra.launcher.max_batch=abc",),
                                          "Value 'abc' of type 'str' could not be converted "
                                          "to Integer"),
    "unknown backend": Row("sweep", ("hydra.launcher.backend=pbs",),
                           "hydra.launcher.backend='pbs': allowed values are local, "
                           "submitit_local, submitit_slurm"),
    "slurm preset without partition": Row("sweep", ("hydra/launcher=batched_slurm",),
                                          "the SLURM partition for the batches is required"),
    "slurm without a cluster": Row("sweep", ("hydra/launcher=batched_slurm",
                                             "hydra.launcher.partition=gpu"),
                                   "with submitit_slurm failed: Could not detect \"srun\""),
    # --- the analysis CLI
    "analysis: no such dir": Row("analysis", ("sweep",), "sweep directory", 2),
    "analysis: no jobs": Row("analysis", ("sweep",), "no featsweep jobs under", 2, empty_dir),
    "analysis: corrupted result.json": Row("analysis", ("sweep",),
                                           "result.json: not readable", 0, corrupt_result),
    "analysis: corrupted image.npy": Row("analysis", ("sweep",), "image.npy: not readable", 0,
                                         corrupt_image),
    "analysis: claim with unknown metric": Row("analysis", ("sweep", *CLAIMS),
                                               "metric column 'display.nonsense' is not in the "
                                               "analysis table", 2,
                                               claims("optimizer.weight_decay",
                                                      "display.nonsense")),
    "analysis: claim with unknown factor": Row("analysis", ("sweep", *CLAIMS),
                                               "factor column 'optimizer.nonsense' is not in the "
                                               "analysis table", 2,
                                               claims("optimizer.nonsense",
                                                      "display.brightness")),
    "analysis: claims file not YAML": Row("analysis", ("sweep", *CLAIMS), "not valid YAML", 2,
                                          not_yaml),
}


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real 4-job sweep (tiny model, 32 px, 5 steps) for the analysis rows to damage copies of."""
    cwd = tmp_path_factory.mktemp("finished")
    proc = run_module("featsweep", "-m", *SMALL, "steps=5", "seed=0,1",
                      "optimizer.weight_decay=0,0.1", f"hydra.sweep.dir={cwd / 'sweep'}",
                      cwd=cwd, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return cwd / "sweep"


def test_the_table_is_big_enough() -> None:
    assert len(ROWS) >= 15
    assert {row.door for row in ROWS.values()} == {"app", "sweep", "analysis"}


# Rows that load torch and a model, or need a finished sweep, take seconds each: marked slow.
FAST_DOORS = ("app",)
NEEDS_MODEL = ("unknown layer", "channel out of range", "cuda absent", "weights file missing",
               "direction of the wrong length", "neuron outside the layer",
               "unknown torchvision arch", "custom target that does not import")


def marks(name: str) -> list[pytest.MarkDecorator]:
    row = ROWS[name]
    quick = row.door in FAST_DOORS and name not in NEEDS_MODEL
    return [] if quick else [pytest.mark.slow]


@pytest.mark.parametrize("name", [pytest.param(n, marks=marks(n)) for n in ROWS])
def test_bad_input_is_rejected_cleanly(name: str, tmp_path: Path,
                                       request: pytest.FixtureRequest) -> None:
    row = ROWS[name]
    if name == "cuda absent":
        import torch

        if torch.cuda.is_available():
            pytest.skip("a CUDA device is visible here")
    if row.door == "app":
        module, args = "featsweep", [*SMALL, *row.args, f"hydra.run.dir={tmp_path / 'run'}"]
    elif row.door == "sweep":
        module = "featsweep"
        args = ["-m", *SMALL, *row.args, f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    else:
        if row.setup is not None:
            row.setup(tmp_path, request.getfixturevalue("finished_sweep"))
        module, args = "featsweep.analysis", [*row.args]
    proc = run_module(module, *args, cwd=tmp_path, timeout=300)
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out, out[-3000:]
    if row.rc is None:
        assert proc.returncode != 0, out[-3000:]
    else:
        assert proc.returncode == row.rc, out[-3000:]
    if proc.returncode == 0:  # reported in the report, skipped, the rest analysed
        report = (tmp_path / "sweep" / "analysis" / "report.md").read_text()
        assert row.fragment in report
        assert "4 job(s), 3 ok, 1 corrupt" in report
    else:
        assert row.fragment in proc.stderr, proc.stderr[-3000:]
    if row.door != "analysis":  # nothing optimized
        assert "optimizing" not in out
