"""Tests for featsweep.search: optimized_metric, and Hydra's Optuna sweeper through featsweep.

The end-to-end tests run the real CLI with ``hydra/sweeper=optuna`` on the tiny model and check
the sweeper's own output (``optimization_results.yaml``) against what the jobs wrote
(result.json) and what the analysis table computes (:func:`featsweep.analysis.collect`).
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from omegaconf import OmegaConf

from featsweep import search
from featsweep.analysis import collect
from featsweep.errors import ConfigError
from featsweep.metrics import METRICS

from _cli import cli_env, run_module

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="pip install -e '.[search]'")

# Composing sets Hydra's global state; restore Hydra's singletons after each test.
pytestmark = pytest.mark.usefixtures("hydra_restore_singletons")

TINY = ["model=tiny", "image.size=32", "device=cpu", "log_every=100"]


# ------------------------------------------------------------------------------- the names


class TestObjectiveNames:
    def test_default_is_activation(self) -> None:
        assert search.objective_names({}) == ("activation",)
        assert search.objective_names({"optimized_metric": None}) == ("activation",)

    @pytest.mark.parametrize("name", ["activation", "display.hf_energy", "raw.brightness",
                                      *[f"display.{m}" for m in METRICS]])
    def test_every_analysis_column_is_allowed(self, name: str) -> None:
        assert search.objective_names({"optimized_metric": name}) == (name,)

    def test_the_names_are_the_analysis_tables_columns(self, tmp_path: Path) -> None:
        """Every allowed name but activation is a display.*/raw.* column of collect's table."""
        job = _fake_job(tmp_path)
        columns = set(collect(job).columns)
        assert set(search.OBJECTIVES) <= columns
        assert {c for c in columns if c.startswith(("display.", "raw."))} == \
            set(search.OBJECTIVES) - {"activation"}

    def test_a_list_is_multi_objective(self) -> None:
        cfg = OmegaConf.create({"optimized_metric": ["activation", "display.hf_energy"]})
        assert search.objective_names(cfg) == ("activation", "display.hf_energy")

    @pytest.mark.parametrize("value, fragment", [
        ("display.hf_enrgy", "did you mean 'display.hf_energy'"),
        ("hf_energy", "unknown metric 'hf_energy'"),
        (["activation", "nope"], "unknown metric 'nope'"),
        ([], "an empty list"),
        (["activation", "activation"], "activation is named more than once"),
        ([1.5], "1.5 is not a metric name"),
        ({"a": 1}, "allowed: activation"),
    ])
    def test_bad_values_are_config_errors(self, value: Any, fragment: str) -> None:
        with pytest.raises(ConfigError) as err:
            search.objective_names(OmegaConf.create({"optimized_metric": value}))
        text = str(err.value)
        assert text.startswith("featsweep: bad config value optimized_metric=")
        assert fragment in text


def test_sweeper_params_on_the_command_line_become_sweep_overrides() -> None:
    argv = ["-m", "hydra.sweeper.params.optimizer.lr=interval(0.001,0.1)",
            "hydra.sweeper.params.seed=choice(0,1)", "hydra.sweeper.n_trials=8", "blur.k=3",
            "hydra.sweeper.params.=x"]
    assert search.params_as_overrides(argv) == [
        "-m", "optimizer.lr=interval(0.001,0.1)", "seed=choice(0,1)", "hydra.sweeper.n_trials=8",
        "blur.k=3", "hydra.sweeper.params.=x"]


class TestDirections:
    def _cfg(self, metric: Any, direction: Any) -> Any:
        return OmegaConf.create({"optimized_metric": metric,
                                 "hydra": {"sweeper": {"direction": direction}}})

    def test_no_sweeper_direction_means_no_search(self) -> None:
        cfg = OmegaConf.create({"optimized_metric": "activation",
                                "hydra": {"sweeper": {"max_batch_size": None}}})
        assert search.sweeper_directions(cfg) is None and not search.in_search(cfg)
        assert search.check(cfg) == ("activation",)

    def test_optunas_enum_and_strings(self) -> None:
        from hydra_plugins.hydra_optuna_sweeper.config import Direction

        cfg = self._cfg(["activation", "display.hf_energy"],
                        [Direction.maximize, "minimize"])
        assert search.sweeper_directions(cfg) == ["maximize", "minimize"]
        assert search.check(cfg) == ("activation", "display.hf_energy")
        assert search.check(self._cfg("activation", Direction.minimize)) == ("activation",)

    def test_one_direction_per_metric(self) -> None:
        with pytest.raises(ConfigError, match=r"hydra\.sweeper\.direction='minimize': "
                           r"optimized_metric names 2 metric\(s\).*"
                           r"hydra\.sweeper\.direction=\[maximize,minimize\]"):
            search.check(self._cfg(["activation", "display.hf_energy"], "minimize"))
        with pytest.raises(ConfigError,
                           match=r"names 1 metric\(s\) \(activation\) but the sweeper has 2"):
            search.check(self._cfg("activation", ["maximize", "minimize"]))


# ------------------------------------------------------------------------------- the value


def _fake_job(tmp_path: Path, status: str = "ok", activation: float | None = 0.25) -> Path:
    """A job directory as featsweep writes it, from a known image (a smooth ramp + a checker)."""
    from PIL import Image

    job = tmp_path / "job"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "config.yaml").write_text("optimized_metric: activation\n")
    y, x = np.mgrid[0:16, 0:16] / 15.0
    img = np.stack([x, y, 0.5 * ((np.indices((16, 16)).sum(0) % 2))], axis=-1).astype(np.float32)
    np.save(job / "image.npy", img)
    Image.fromarray((img * 255).round().astype(np.uint8)).save(job / "image.png")
    (job / "result.json").write_text(json.dumps({"status": status, "activation": activation}))
    return job


class TestJobValue:
    def test_activation_is_result_json(self, tmp_path: Path) -> None:
        assert search.job_value({}, {"status": "ok", "activation": 0.125}) == 0.125

    def test_image_metrics_equal_the_analysis_table(self, tmp_path: Path) -> None:
        job = _fake_job(tmp_path)
        row = collect(job).iloc[0]
        names = ["display.hf_energy", "raw.brightness", "activation", "display.checkerboard"]
        got = search.job_value({"optimized_metric": names}, {"status": "ok", "activation": 0.25},
                               job)
        assert got == [row[n] for n in names]
        luma = np.load(job / "image.npy") @ np.array([0.299, 0.587, 0.114])
        assert got[1] == pytest.approx(luma.mean(), rel=1e-6)  # raw.brightness by definition
        one = search.job_value({"optimized_metric": ["raw.contrast"]}, {"status": "ok"}, job)
        assert isinstance(one, float) and one == row["raw.contrast"]  # a list of one: a float

    @pytest.mark.parametrize("status", ["diverged", "failed", "interrupted", "not_started"])
    def test_a_trial_that_did_not_finish_ok_returns_none(self, tmp_path: Path,
                                                         status: str) -> None:
        # A diverged job's activation is its last finite value, often huge: it must not win.
        assert search.job_value({}, {"status": status, "activation": 1e30}) is None
        assert search.job_value({"optimized_metric": ["activation", "raw.contrast"]},
                                {"status": status, "activation": 1.0}, tmp_path) is None

    def test_a_non_finite_value_returns_none(self, tmp_path: Path) -> None:
        assert search.job_value({}, {"status": "ok", "activation": None}) is None
        assert search.job_value({}, {"status": "ok", "activation": math.inf}) is None
        # image.png missing: collect's NaN -> None, not a crash
        assert search.job_value({"optimized_metric": "display.contrast"}, {"status": "ok"},
                                tmp_path) is None


# ------------------------------------------------------------------------------- end to end


def _results(sweep: Path) -> dict[int, dict[str, Any]]:
    return {int(p.parent.name): json.loads(p.read_text()) for p in sweep.glob("*/result.json")}


def _param(job: Path, key: str) -> str:
    overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
    return next(o.split("=", 1)[1] for o in overrides if o.startswith(key + "="))


def _ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_optuna_rounds_run_as_batches_and_best_value_is_the_best_trial(tmp_path: Path) -> None:
    """The issue's command, spelled as there (hydra.sweeper.params.optimizer.lr=interval(...),
    which featsweep's CLI passes on as optimizer.lr=interval(...)): 8 trials, 4 per round -> 2
    batches of 4; best_value is the highest result.json activation of the 8 and best_params are
    that trial's."""
    sweep = tmp_path / "sweep"
    log = _ok(run_module(
        "featsweep", "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=8",
        "hydra.sweeper.n_jobs=4", "hydra.sweeper.direction=maximize",
        "hydra.sweeper.params.optimizer.lr=interval(0.001,0.1)", *TINY, "steps=10",
        f"hydra.sweep.dir={sweep}", cwd=tmp_path))
    batches = re.findall(r"Batched (\d+) jobs into (\d+) batch\(es\)", log)
    assert batches == [("4", "1"), ("4", "1")], log[-3000:]
    results = _results(sweep)
    assert sorted(results) == list(range(8))
    assert {r["status"] for r in results.values()} == {"ok"}
    assert {r["batch_size"] for r in results.values()} == {4}
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    top = max(results, key=lambda i: results[i]["activation"])
    assert best.best_value == results[top]["activation"] == max(
        r["activation"] for r in results.values())
    assert float(best.best_params["optimizer.lr"]) == float(_param(sweep / str(top),
                                                                   "optimizer.lr"))


@pytest.mark.slow
def test_multi_objective_writes_the_pareto_set_of_the_analysis_numbers(tmp_path: Path) -> None:
    """optimized_metric=[activation,display.hf_energy], maximize/minimize: the sweeper's
    solutions are exactly the non-dominated trials of the analysis table's two columns."""
    sweep = tmp_path / "sweep"
    _ok(run_module(
        "featsweep", "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=4",
        "hydra.sweeper.n_jobs=4", "hydra.sweeper.direction=[maximize,minimize]",
        "optimized_metric=[activation,display.hf_energy]", "optimizer.lr=interval(0.001,0.5)",
        *TINY, "steps=8", f"hydra.sweep.dir={sweep}", cwd=tmp_path))
    table = collect(sweep)
    points = {int(r["job.num"]): (r["activation"], r["display.hf_energy"])
              for _, r in table.iterrows()}
    assert len(points) == 4 and all(math.isfinite(v) for p in points.values() for v in p)

    def dominated(p: tuple[float, float]) -> bool:
        return any(q[0] >= p[0] and q[1] <= p[1] and q != p for q in points.values())

    solutions = OmegaConf.to_container(OmegaConf.load(sweep / "optimization_results.yaml"))
    assert isinstance(solutions, dict) and "best_value" not in solutions
    # Each solution is one trial: its params are that job's overrides and its values are the
    # job's activation (exactly) and display.hf_energy (up to float rounding: the analysis
    # computes all jobs' metrics in one batch, the job its own alone).
    chosen = set()
    for s in solutions["solutions"]:
        lr = float(s["params"]["optimizer.lr"])
        num = next(n for n in points if float(_param(sweep / str(n), "optimizer.lr")) == lr)
        assert s["values"][0] == points[num][0]
        assert s["values"][1] == pytest.approx(points[num][1], rel=1e-12, abs=0)
        chosen.add(num)
    pareto = {n for n, p in points.items() if not dominated(p)}
    assert chosen == pareto and len(chosen) >= 1


# Makes every engine batch that holds a seed=1 job run out of memory: the launcher splits the
# batch and retries, so exactly the seed=1 jobs fail (status "failed"), as one image too large
# for the GPU would.
FAILING_MAIN = """
import featsweep.engine as engine
real = engine.run_batch
def run_batch(specs, *args, **kwargs):
    if any(spec.seed == 1 for spec in specs):
        raise RuntimeError("CUDA out of memory (injected for seed 1)")
    return real(specs, *args, **kwargs)
engine.run_batch = run_batch
from featsweep.__main__ import main
main()
"""


@pytest.mark.slow
def test_diverged_and_failed_trials_do_not_stop_the_search(tmp_path: Path) -> None:
    """SGD lr 1000 · weight decay 10 without clamping overflows at step 10 (tests/test_engine.py):
    those trials diverge; seed=1 trials raise. Each returns None (an Optuna FAIL trial) and the
    search finishes, its best being the best trial that finished ok.

    (Random sampler, seeded so that the 6 trials hold all three kinds. Not the grid sampler:
    hydra-optuna-sweeper 1.3.0 crashes when the grid's last trial fails, "Study.stop is supposed
    to be invoked inside an objective function", whatever the trial returns.)"""
    sweep = tmp_path / "sweep"
    script = tmp_path / "failing_main.py"
    script.write_text(FAILING_MAIN)
    proc = subprocess.run(
        [sys.executable, str(script), "-m", "hydra/sweeper=optuna",
         "hydra/sweeper/sampler=random", "hydra.sweeper.sampler.seed=5",
         "hydra.sweeper.n_trials=6", "hydra.sweeper.n_jobs=6",
         "hydra.sweeper.direction=maximize", "regularizer.clamp=choice(true,false)",
         "seed=choice(0,1)", "optimizer.lr=1000", "optimizer.weight_decay=10", *TINY,
         "steps=10", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=600)
    log = _ok(proc)
    results = _results(sweep)
    assert len(results) == 6
    kinds: dict[str, list[float]] = {"ok": [], "diverged": [], "failed": []}
    for n, result in results.items():
        clamp, seed = (_param(sweep / str(n), k) for k in ("regularizer.clamp", "seed"))
        expected = "failed" if seed == "1" else "ok" if clamp.lower() == "true" else "diverged"
        assert result["status"] == expected, (n, clamp, seed, result)
        kinds[expected].append(result["activation"])
    assert all(kinds.values()), kinds  # each kind at least once
    assert log.count("Failed experiment") == len(kinds["diverged"]) + len(kinds["failed"])
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    assert best.best_value == max(kinds["ok"])
    # a diverged trial's activation (its last finite value) is larger, yet it did not win
    assert max(a for a in kinds["diverged"] if a is not None) > best.best_value


def test_a_bad_optimized_metric_stops_before_any_work(tmp_path: Path) -> None:
    """Directions that do not match the metrics: one message, no job run, no file written (the
    message table of every bad optimized_metric is tests/test_bad_inputs.py)."""
    sweep = tmp_path / "sweep"
    fragment = ("bad config value hydra.sweeper.direction='maximize': optimized_metric names 2 "
                "metric(s)")
    proc = run_module("featsweep", "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2",
                      "hydra.sweeper.n_jobs=2", "optimizer.lr=interval(0.001,0.1)",
                      "optimized_metric=[activation,display.hf_energy]",
                      "hydra.sweeper.direction=maximize", *TINY, "steps=5",
                      f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode != 0
    assert fragment in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not list(sweep.glob("*/result.json")) and not list(sweep.glob("*/image.png"))


def test_the_preset_composes_as_an_optuna_search() -> None:
    from hydra import compose, initialize_config_dir

    import featsweep

    conf = str(Path(featsweep.__file__).resolve().parent / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        cfg = compose("config", overrides=["hparams_search=optuna_example"],
                      return_hydra_config=True)
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    params = dict(cfg.hydra.sweeper.params)
    assert set(params) == {"optimizer.lr", "optimizer.weight_decay", "blur.k", "transform.jitter",
                           "param.decay"}
    assert cfg.param.kind == "fft" and cfg.optimizer.name == "adam"  # decay shapes an FFT image
    assert search.check(cfg) == ("activation",)


@pytest.mark.slow
def test_the_preset_runs_and_the_basic_launcher_returns_the_image_metric(tmp_path: Path) -> None:
    """hparams_search=optuna_example (no -m: the preset sets hydra.mode) at toy size, through
    hydra/launcher=basic (one job at a time, featsweep.app.task) and minimizing an image metric:
    each trial ran with the values Optuna proposed for all five searched keys, and best_value is
    the lowest display.hf_energy of the analysis table."""
    sweep = tmp_path / "sweep"
    _ok(run_module("featsweep", "hparams_search=optuna_example", "hydra/launcher=basic",
                   "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2",
                   "optimized_metric=display.hf_energy", "hydra.sweeper.direction=minimize",
                   *TINY, "steps=3", f"hydra.sweep.dir={sweep}", cwd=tmp_path))
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    table = collect(sweep)
    assert len(table) == 2 and set(table["status"]) == {"ok"}
    # The analysis computes all jobs' metrics in one batch, the job its own alone: equal up to
    # float rounding (FFT sums in another order), ~1e-16 relative.
    assert best.best_value == pytest.approx(table["display.hf_energy"].min(), rel=1e-12, abs=0)
    top = int(table.loc[table["display.hf_energy"].idxmin(), "job.num"])
    config = OmegaConf.load(sweep / str(top) / ".hydra" / "config.yaml")
    assert set(best.best_params) == {"optimizer.lr", "optimizer.weight_decay", "blur.k",
                                     "transform.jitter", "param.decay"}
    for key, value in best.best_params.items():
        assert OmegaConf.select(config, key) == pytest.approx(value), key

def test_optimized_metric_is_bookkeeping_not_a_setting() -> None:
    """The same images whatever a search optimizes: resume's fingerprint ignores the key, and the
    analysis does not pair jobs by it."""
    from hydra import compose, initialize_config_dir

    import featsweep
    from featsweep.analysis.columns import is_config_column
    from featsweep.jobs import config_hash

    conf = str(Path(featsweep.__file__).resolve().parent / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        base = compose("config", overrides=["model=tiny"])
        other = compose("config", overrides=["model=tiny", "optimized_metric=display.hf_energy"])
        changed = compose("config", overrides=["model=tiny", "steps=7"])
    assert config_hash(base) == config_hash(other) != config_hash(changed)
    assert not is_config_column("optimized_metric") and is_config_column("steps")
