"""featsweep.analysis: synthetic job dirs with known values -> table, report, CLI; and end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

import featsweep.analysis
from featsweep.analysis import CollectError, collect
from featsweep.analysis.__main__ import main as cli_main
from featsweep.analysis.claims import RESULT_COLUMNS, Claim, ClaimsError
from featsweep.analysis.collect import CACHE_FILE, CONVERGENCE_COLUMNS, RESULT_KEYS, TRACE_COLUMNS
from featsweep.analysis.report import (
    CLAIMS_COLUMNS,
    NOT_IN_SWEEP,
    claims_table,
    swept_factors,
    write_report,
)
from featsweep.artifacts import write_failure, write_job
from featsweep.engine import JobOutcome
from featsweep.errors import UserError
from featsweep.metrics import METRICS

collect_module = sys.modules["featsweep.analysis.collect"]
cache_module = sys.modules["featsweep.analysis.metric_cache"]
ROOT = Path(__file__).resolve().parents[1]
H = W = 8

# Config leaves of the synthetic jobs, in file order (what the table's config columns must be).
CONFIG_LEAVES = [
    "model.name", "target.layer", "target.channel", "target.relu", "optimizer.name",
    "optimizer.lr", "optimizer.momentum", "optimizer.weight_decay", "optimizer.betas",
    "regularizer.clamp", "blur.kind", "blur.k", "image.size", "steps", "seed",
]


def config(wd: float, seed: int) -> dict:
    return {
        "model": {"name": "tiny"},
        "target": {"layer": "block3", "channel": 3, "relu": "post"},
        "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": wd,
                      "betas": [0.9, 0.999]},
        "regularizer": {"clamp": True},
        "blur": {"kind": "box", "k": 3},
        "image": {"size": H},
        "steps": 10,
        "seed": seed,
    }


def half_image() -> np.ndarray:
    """Left half 0, right half 1: stretched to 0/255, so display brightness 0.5, contrast 0.5."""
    img = np.zeros((H, W, 3), np.float32)
    img[:, W // 2:] = 1.0
    return img


def outcome(pixels: np.ndarray, activation: float = 20.0, status: str = "ok") -> JobOutcome:
    steps = np.arange(11, dtype=float)
    return JobOutcome(
        status=status, activation=activation, activation_start=0.0, steps_done=10,
        trace=np.stack([steps, 2.0 * steps], axis=1),  # activation = 2 · step
        optimized=half_image(), before_blur=half_image(), pixels=pixels.astype(np.float32),
        seconds=1.5, device="cpu", info={"batch_size": 4, "layer": "block3"},
    )


def hydra_files(job: Path, num: int, overrides: list[str], cfg: dict) -> None:
    (job / ".hydra").mkdir(parents=True, exist_ok=True)
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    hydra = {"hydra": {
        "sweep": {"subdir": "${hydra.job.num}"},
        "job": {"num": num, "override_dirname": ",".join(overrides)},
        "runtime": {"choices": {"optimizer": "sgd", "model": "tiny", "experiment": None,
                                "hydra/launcher": "batched"}},
    }}
    (job / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra, sort_keys=False))


def make_sweep(root: Path) -> Path:
    """4 finished jobs: weight decay 0 / 0.1 × seed 0 / 1; raw image constant 0.25 + 0.5·wd."""
    num = 0
    for wd in (0.0, 0.1):
        for seed in (0, 1):
            job = root / str(num)
            hydra_files(job, num, [f"optimizer.weight_decay={wd}", f"seed={seed}", "experiment=x"],
                        config(wd, seed))
            write_job(job, outcome(np.full((H, W, 3), 0.25 + 0.5 * wd), activation=20.0 + seed))
            num += 1
    return root


@pytest.fixture()
def sweep(tmp_path: Path) -> Path:
    return make_sweep(tmp_path / "sweep")


def expected_columns(extra_results: list[str]) -> list[str]:
    return (["job.num", "job.dir", "job.sweep", "job.overrides"] + CONFIG_LEAVES
            + ["choice.experiment", "choice.model", "choice.optimizer", "status", "activation"]
            + [f"result.{k}" for k in RESULT_KEYS] + [f"result.{k}" for k in extra_results]
            + list(TRACE_COLUMNS) + list(CONVERGENCE_COLUMNS)
            + [f"display.{m}" for m in METRICS] + [f"raw.{m}" for m in METRICS])


# ------------------------------------------------------------------------------------ collect


def test_collect_columns_and_known_values(sweep: Path) -> None:
    df = collect(sweep)
    extra = sorted(c[len("result."):] for c in df.columns if c.startswith("result.")
                   and c[len("result."):] not in RESULT_KEYS)
    assert "layer" in extra  # other result.json fields follow the CONTRACTS ones, sorted
    assert list(df.columns) == expected_columns(extra)
    assert df["job.sweep"].tolist() == ["."] * 4
    assert df["job.num"].tolist() == [0, 1, 2, 3]
    assert df["job.dir"].tolist() == [str((sweep / str(i)).resolve()) for i in range(4)]
    assert df.loc[3, "job.overrides"] == "optimizer.weight_decay=0.1 seed=1 experiment=x"
    assert df["optimizer.weight_decay"].tolist() == [0.0, 0.0, 0.1, 0.1]
    assert df["seed"].tolist() == [0, 1, 0, 1] and df["seed"].dtype == np.int64
    assert df["regularizer.clamp"].dtype == bool
    assert df.loc[0, "optimizer.betas"] == "[0.9, 0.999]"  # list leaves as their repr
    assert df["choice.optimizer"].tolist() == ["sgd"] * 4
    assert df["status"].tolist() == ["ok"] * 4
    assert df["activation"].tolist() == [20.0, 21.0, 20.0, 21.0]
    assert df["result.batch_size"].tolist() == [4] * 4
    assert df["result.error"].isna().all() and df["result.steps_requested"].isna().all()
    # trace: activation = 2·step over steps 0..10
    assert df.loc[0, TRACE_COLUMNS].tolist() == [0.0, 2.0, 10.0, 20.0]
    # last 10 %: 18 -> 20 over a final 20, a 10 % gain: not converged
    assert df["trace.gain_last10%"].tolist() == pytest.approx([0.1] * 4)
    assert df["trace.converged"].tolist() == [False] * 4 and df["trace.converged"].dtype == bool
    # display: the half-black, half-white image; raw: constant 0.25 + 0.5·wd
    assert df["display.brightness"].tolist() == pytest.approx([0.5] * 4)
    assert df["display.contrast"].tolist() == pytest.approx([0.5] * 4)
    assert df["display.clip_fraction"].tolist() == pytest.approx([1.0] * 4)
    assert df["raw.brightness"].tolist() == pytest.approx([0.25, 0.25, 0.3, 0.3], abs=1e-6)
    assert df["raw.contrast"].tolist() == pytest.approx([0.0] * 4, abs=1e-7)
    assert df["raw.hf_energy"].isna().all()  # a constant image has no spectrum
    assert df.attrs["sweep_dir"] == str(sweep.resolve())


def test_collect_is_reexported_and_config_floats_parse(tmp_path: Path) -> None:
    assert featsweep.analysis.collect is collect_module.collect
    job = tmp_path / "0"
    hydra_files(job, 0, ["optimizer.weight_decay=1e-5"], {"optimizer": {"weight_decay": 0.0}})
    # Hand-written YAML 1.2 float (no dot) and an interpolation: both as OmegaConf reads them.
    (job / ".hydra" / "config.yaml").write_text(
        "optimizer:\n  weight_decay: 1e-5\n  lr: 0.5\n  half: ${optimizer.lr}\nextra: {}\n")
    df = collect(tmp_path)
    assert df.loc[0, "optimizer.weight_decay"] == 1e-5
    assert df.loc[0, "optimizer.half"] == 0.5
    assert df.loc[0, "extra"] == "{}"


def test_rows_sorted_by_job_num_over_several_sweeps(tmp_path: Path) -> None:
    for sweep, nums in (("b", (1, 0)), ("a", (2,))):
        for num in nums:
            job = tmp_path / sweep / f"job{num}"
            hydra_files(job, num, [f"seed={num}"], config(0.0, num))
            write_job(job, outcome(np.full((H, W, 3), 0.5)))
    df = collect(tmp_path)
    assert df["job.num"].tolist() == [0, 1, 2]
    assert [Path(d).relative_to(tmp_path.resolve()).as_posix() for d in df["job.dir"]] == [
        "b/job0", "b/job1", "a/job2"]


def test_running_incomplete_failed_and_corrupt_jobs_are_kept(sweep: Path) -> None:
    # job 4: started, no result.json (fresh: running); job 5: same but old (incomplete)
    for num in (4, 5):
        hydra_files(sweep / str(num), num, ["seed=9"], config(0.0, 9))
    old = time.time() - 7200
    for path in [sweep / "5", *(sweep / "5").rglob("*")]:
        os.utime(path, (old, old))
    write_failure(sweep / "6", "RuntimeError: boom")
    hydra_files(sweep / "6", 6, ["seed=8"], config(0.0, 8))
    (sweep / "0" / "result.json").write_text("{not json")
    np.save(sweep / "1" / "image.npy", np.zeros((4, 4), np.float32))  # not H×W×3
    (sweep / "2" / "image.npy").write_bytes(b"garbage")

    df = collect(sweep).set_index("job.num")
    assert df["status"].to_dict() == {0: "corrupt", 1: "corrupt", 2: "corrupt", 3: "ok",
                                      4: "running", 5: "incomplete", 6: "failed"}
    assert df.loc[0, "result.error"].startswith("result.json: not readable")
    assert np.isnan(df.loc[0, "activation"])
    assert df.loc[0, "display.brightness"] == pytest.approx(0.5)  # the rest is still analysed
    assert df.loc[0, "raw.brightness"] == pytest.approx(0.25, abs=1e-6)
    assert df.loc[1, "result.error"].startswith("image.npy: not readable (holds an array of shape (4, 4)")
    assert df.loc[2, "result.error"].startswith("image.npy: not readable")
    assert np.isnan(df.loc[2, "raw.brightness"]) and df.loc[2, "display.brightness"] == pytest.approx(0.5)
    assert df.loc[2, "activation"] == 20.0
    assert df.loc[6, "result.error"] == "RuntimeError: boom"
    for num in (4, 5, 6):
        assert np.isnan(df.loc[num, "display.brightness"]) and np.isnan(df.loc[num, "trace.act@0"])
    assert collect(sweep, stale_after=1e9).set_index("job.num").loc[5, "status"] == "running"


def test_trace_points_take_the_last_recorded_step(tmp_path: Path) -> None:
    job = tmp_path / "0"
    hydra_files(job, 0, [], config(0.0, 0))
    (job / "trace.csv").write_text("step,activation\n0,1\n4,2\n8,3\n10,4\n")
    row = collect(tmp_path).iloc[0]
    # 10 % of 10 = step 1 -> recorded step 0; 50 % = 5 -> step 4; 100 % -> step 10
    assert row[list(TRACE_COLUMNS)].tolist() == [1.0, 1.0, 2.0, 4.0]
    # 90 % of 10 = step 9 -> recorded step 8 (3): gain (4 − 3) / 4 = 25 %, still rising
    assert row["trace.gain_last10%"] == pytest.approx(0.25) and not row["trace.converged"]
    (job / "trace.csv").write_text("step,activation\n0,1\n5,4\n9,4\n10,4.01\n")
    row = collect(tmp_path).iloc[0]
    assert row["trace.gain_last10%"] == pytest.approx(0.01 / 4.01) and row["trace.converged"]
    (job / "trace.csv").write_text("step;activation\n")
    row = collect(tmp_path).iloc[0]
    assert row["status"] == "corrupt" and row["result.error"].startswith("trace.csv: header")


def test_metrics_cache_is_used_and_invalidated(sweep: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = {p: p.stat().st_mtime_ns for p in sweep.rglob("*")}
    first = collect(sweep)
    # The cache lives in SWEEP/analysis/, never in a job directory (artifacts writes those).
    assert {p: p.stat().st_mtime_ns for p in sweep.rglob("*") if "analysis" not in p.parts} == before
    path = sweep / "analysis" / CACHE_FILE
    cache = json.loads(path.read_text())
    assert sorted(cache["jobs"]) == ["0", "1", "2", "3"]
    assert set(cache["jobs"]["0"]) == {"display", "raw"}
    calls: list[int] = []
    real = cache_module.image_stats_batch

    def counting(imgs: np.ndarray) -> dict:
        calls.append(len(imgs))
        return real(imgs)

    monkeypatch.setattr(cache_module, "image_stats_batch", counting)
    again = collect(sweep)
    assert calls == []  # nothing recomputed
    pd.testing.assert_frame_equal(first, again)
    written = path.stat().st_mtime_ns
    os.utime(path, ns=(written - 10**9, written - 10**9))
    collect(sweep)
    assert path.stat().st_mtime_ns == written - 10**9  # unchanged: not rewritten

    np.save(sweep / "3" / "image.npy", np.full((H, W, 3), 0.75, np.float32))  # same size
    os.utime(sweep / "3" / "image.npy", ns=(1, 1))  # mtime changes even on coarse clocks
    third = collect(sweep)
    assert calls == [1]  # only job 3's raw image
    assert third.loc[3, "raw.brightness"] == pytest.approx(0.75, abs=1e-6)
    assert third.loc[3, "display.brightness"] == first.loc[3, "display.brightness"]
    assert json.loads(path.read_text())["jobs"]["3"]["raw"]["values"]["brightness"] == pytest.approx(0.75)
    # Collecting one job directory writes no cache at all (it would land inside the job).
    collect(sweep / "1")
    assert not (sweep / "1" / "analysis").exists()


def test_missing_and_empty_directories_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(CollectError, match="does not exist"):
        collect(tmp_path / "nope")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(CollectError, match="no featsweep jobs under") as info:
        collect(tmp_path / "empty")
    assert isinstance(info.value, UserError)


# ------------------------------------------------------------------------ claims and report


def test_claims_table_marks_claims_outside_the_sweep(sweep: Path) -> None:
    df = collect(sweep)
    claims = [
        Claim("wd darker", "optimizer.weight_decay", "raw.brightness", "decrease"),
        Claim("clamp", "regularizer.clamp", "display.dominance", "increase", levels=(True, False)),
        Claim("blur", "blur.k", "display.hf_energy", "decrease"),
        Claim("adam", "optimizer.name", "display.contrast", "any", levels=("sgd", "adam")),
    ]
    table = claims_table(df, claims, n_boot=200)
    assert list(table.columns) == list(CLAIMS_COLUMNS) == [*RESULT_COLUMNS, "note"]
    assert table["verdict"].tolist()[1:] == [NOT_IN_SWEEP] * 3
    assert "regularizer.clamp never is false" in table.loc[1, "reason"]
    assert table.loc[2, "reason"] == "factor does not vary: blur.k takes one value here (3)"
    row = table.iloc[0]
    assert row["test"] == "spearman" and row["n_groups"] == 2 and row["statistic"] == pytest.approx(1.0)
    # Two seeds of one channel are one unit: too few to generalize, and the row says why.
    assert row["unit"] == "target.channel" and row["n_units"] == 1
    assert row["verdict"] == "inconclusive" and row["reason"] == "1 unit(s) < 8 needed"
    assert row["n_unconverged"] == 4  # the synthetic traces still rise by 10 %
    assert "4 of 4 job(s) had not converged" in row["note"]
    # a typo is an error before anything is computed
    with pytest.raises(ClaimsError, match="display.brigthness"):
        claims_table(df, [Claim("typo", "optimizer.weight_decay", "display.brigthness", "decrease")])


def test_swept_factors_from_overrides(sweep: Path) -> None:
    assert swept_factors(collect(sweep)) == {"optimizer.weight_decay": ["0.0", "0.1"],
                                             "seed": ["0", "1"]}


def test_report_on_a_running_sweep(sweep: Path, tmp_path: Path) -> None:
    hydra_files(sweep / "4", 4, ["optimizer.weight_decay=0.0", "seed=2", "experiment=x"],
                config(0.0, 2))
    report = write_report(sweep, out_dir=tmp_path / "out", n_boot=200)
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"runs.parquet", "runs.csv", "claims.csv", "report.md", "contact_sheet.png",
            "activation.png"} <= names
    assert any(n.startswith("claim_") and n.endswith(".png") for n in names)
    text = report.read_text()
    assert "| running | 1 |" in text and "contact_sheet.png" in text and "| claim |" in text
    assert NOT_IN_SWEEP in text
    runs = pd.read_parquet(tmp_path / "out" / "runs.parquet")
    assert runs["status"].tolist() == ["ok"] * 4 + ["running"]
    claims = pd.read_csv(tmp_path / "out" / "claims.csv")
    assert list(claims.columns) == list(CLAIMS_COLUMNS)


def test_cli_user_errors_exit_2_with_one_message(sweep: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    assert cli_main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err
    bad = tmp_path / "claims.yaml"
    bad.write_text("claims:\n  - name: x\n    factor: optimizer.weight_decay\n"
                   "    metric: display.brigthness\n    direction: decrease\n")
    assert cli_main([str(sweep), "--claims", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "display.brigthness" in err and "did you mean 'display.brightness'" in err
    # nothing of the analysis written (only collect's metric cache)
    assert sorted(p.name for p in (sweep / "analysis").iterdir()) == [CACHE_FILE]


# ------------------------------------------------------------------------------- end to end


def run_notebook(path: Path, sweep_dir: Path, out: Path) -> None:
    """Run a notebook the way the README says: papermill, with sweep_dir as a parameter."""
    import nbformat
    import papermill

    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    first = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    assert "sweep_dir =" in first.source
    papermill.execute_notebook(str(path), str(out), parameters={"sweep_dir": str(sweep_dir)},
                               kernel_name="python3", cwd=str(sweep_dir), progress_bar=False)
    done = nbformat.read(out, as_version=4)
    images = [o for c in done.cells if c.cell_type == "code" for o in c.outputs
              if "image/png" in o.get("data", {})]
    assert images, f"{path.name} showed no picture"


@pytest.mark.slow
def test_end_to_end_smoke_sweep_cli_and_notebooks(tmp_path: Path) -> None:
    sweep = tmp_path / "smoke"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    subprocess.run([sys.executable, "-m", "featsweep", "experiment=smoke",
                    f"hydra.sweep.dir={sweep}"], cwd=tmp_path, env=env, check=True,
                   capture_output=True, timeout=600)
    done = subprocess.run([sys.executable, "-m", "featsweep.analysis", str(sweep), "--quality"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    out = sweep / "analysis"
    for name in ("runs.parquet", "runs.csv", "claims.csv", "report.md", "contact_sheet.png",
                 "activation.png"):
        assert (out / name).stat().st_size > 0, name
    jobs = sorted(p.parent.parent for p in sweep.glob("*/.hydra/config.yaml"))
    runs = pd.read_parquet(out / "runs.parquet")
    assert len(runs) == len(jobs) == 8
    assert runs["job.num"].tolist() == list(range(8))
    assert runs["status"].eq("ok").all()
    columns = list(runs.columns)
    assert columns[:4] == ["job.num", "job.dir", "job.sweep", "job.overrides"]
    for name in ("optimizer.lr", "optimizer.weight_decay", "optimizer.betas", "blur.k", "steps",
                 "seed", "target.channel", "choice.optimizer", "status", "activation",
                 "result.seconds", "result.error", *TRACE_COLUMNS,
                 *(f"{p}.{m}" for p in ("display", "raw") for m in METRICS)):
        assert name in columns, name
    assert runs[[f"display.{m}" for m in ("brightness", "contrast", "clip_fraction")]].notna().all().all()
    assert list(pd.read_csv(out / "runs.csv").columns) == columns
    claims = pd.read_csv(out / "claims.csv")
    assert len(claims) == 13 and NOT_IN_SWEEP in set(claims["verdict"])
    report = (out / "report.md").read_text()
    assert "![" in report and "| ok | 8 |" in report
    # --quality on a real sweep: dataset examples beside the visualizations, the new metrics,
    # and whether each run converged.
    assert "## Dataset examples" in report and list(out.glob("examples_*.png"))
    assert runs["quality.natural_ratio"].notna().all() and runs["quality.robustness"].notna().any()
    # robustness is undefined (NaN) exactly where the clean activation is 0 (a dead channel)
    undefined = runs["quality.robustness"].isna()
    assert (runs.loc[undefined, "quality.natural_ratio"] == 0).all()
    assert "Convergence: " in report and runs["trace.converged"].notna().all()
    for notebook in ("claims.ipynb", "explore.ipynb"):
        run_notebook(ROOT / "analysis" / notebook, sweep, tmp_path / f"out_{notebook}")
    # Hydra's own multirun.yaml plans 8 jobs: with two job directories gone (a sweep killed
    # before they started), the report says so and names them.
    import shutil

    gone = [runs.loc[i, "job.overrides"] for i in (6, 7)]
    for i in (6, 7):
        shutil.rmtree(sweep / str(i))
    again = subprocess.run([sys.executable, "-m", "featsweep.analysis", str(sweep)], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    report = (out / "report.md").read_text()
    assert "**Incomplete: 2 of 8 planned jobs have no directory.**" in report
    assert all(f"| {o} |" in report for o in gone), gone


# ------------------------------------------------------------- honest outcomes, sweeps, pictures


def multirun_yaml(sweep: Path, task: list[str], params: dict | None = None,
                  sweeper: str = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper") -> None:
    """The parts of Hydra's multirun.yaml the analysis reads (Hydra writes the whole config)."""
    sweep.mkdir(parents=True, exist_ok=True)
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {
        "sweeper": {"_target_": sweeper, "max_batch_size": None, "params": params},
        "overrides": {"hydra": [f"hydra.sweep.dir={sweep}"], "task": task},
    }, "steps": 10}))


def test_not_started_job_is_reported_not_started_with_its_error(sweep: Path, tmp_path: Path) -> None:
    """A run rejected at validation gets result.json status not_started (written by the app)."""
    job = sweep / "4"
    hydra_files(job, 4, ["optimizer.weight_decay=0.0", "seed=2", "experiment=x"], config(0.0, 2))
    (job / "result.json").write_text(json.dumps({
        "status": "not_started", "error": "featsweep: blur.k must be odd and ≥ 1, got 4"}))
    df = collect(sweep)
    assert df.loc[4, "status"] == "not_started"
    text = write_report(sweep, out_dir=tmp_path / "out", n_boot=200).read_text()
    assert "| not started | 1 |" in text and "| running |" not in text
    assert "blur.k must be odd and ≥ 1, got 4" in text


def test_killed_sweep_lists_its_missing_jobs(tmp_path: Path) -> None:
    """6 planned (3 seeds × 2 weight decays), 2 on disk: one finished, one killed mid-run."""
    sweep = tmp_path / "killed"
    multirun_yaml(sweep, ["optimizer.weight_decay=0.0,0.1", "experiment=x"], {"seed": "0,1,2"})
    for num, (seed, wd) in enumerate([(0, 0.0), (0, 0.1)]):
        job = sweep / str(num)
        hydra_files(job, num, [f"seed={seed}", f"optimizer.weight_decay={wd}", "experiment=x"],
                    config(wd, seed))
    write_job(sweep / "0", outcome(np.full((H, W, 3), 0.25)))
    old = time.time() - 7200  # job 1 started, then the sweep was SIGKILLed long ago
    for path in [sweep / "1", *(sweep / "1").rglob("*")]:
        os.utime(path, (old, old))
    text = write_report(sweep, out_dir=tmp_path / "out", n_boot=200).read_text()
    assert "**Incomplete: 4 of 6 planned jobs have no directory.**" in text
    for missing in ("seed=1 optimizer.weight_decay=0.0", "seed=2 optimizer.weight_decay=0.1"):
        assert f"{missing} experiment=x |" in text
    assert "| incomplete | 1 |" in text and "| ok | 1 |" in text
    # A complete sweep says nothing of the kind; a sweeper that plans as it goes has no plan.
    from featsweep.analysis.report import sweep_status

    multirun_yaml(sweep, ["optimizer.weight_decay=0.0,0.1", "experiment=x"], {"seed": "0"})
    assert sweep_status(collect(sweep), sweep)["missing"].tolist() == [0]
    multirun_yaml(sweep, ["seed=0"], sweeper="hydra_plugins.hydra_optuna_sweeper.OptunaSweeper")
    assert "picks jobs as it goes" in sweep_status(collect(sweep), sweep)["note"].iloc[0]


def test_a_folder_of_several_sweeps_says_so_and_lists_each(tmp_path: Path) -> None:
    for name, seeds in (("a", (0, 1)), ("b", (5,))):
        sweep = tmp_path / name
        multirun_yaml(sweep, [f"seed={','.join(map(str, seeds))}"])
        for num, seed in enumerate(seeds):
            hydra_files(sweep / str(num), num, [f"seed={seed}"], config(0.0, seed))
            write_job(sweep / str(num), outcome(np.full((H, W, 3), 0.5)))
    df = collect(tmp_path)
    assert df["job.sweep"].tolist() == ["a", "b", "a"]  # sorted by job.num, then dir
    text = write_report(tmp_path, out_dir=tmp_path / "out", n_boot=200).read_text()
    assert "**This folder holds 2 sweeps**" in text
    assert "| a | 2 | 2 | 0 | 2 ok |" in text and "| b | 1 | 1 | 0 | 1 ok |" in text


def test_raw_metrics_use_the_unclipped_image(tmp_path: Path) -> None:
    job = tmp_path / "0"
    hydra_files(job, 0, [], config(0.0, 0))
    pixels = np.full((H, W, 3), 1.5, np.float32)
    pixels[:, : W // 2] = -0.5  # an unclamped run: half the image below 0, half above 1
    write_job(job, outcome(pixels))
    row = collect(tmp_path).iloc[0]
    assert row["raw.brightness"] == pytest.approx(0.5, abs=1e-6)  # clipped, it would be 0.5 too …
    assert row["raw.contrast"] == pytest.approx(1.0, abs=1e-6)  # … but its contrast would be 0.5
    assert np.isfinite([row[f"raw.{m}"] for m in METRICS if m not in ("spectral_slope",)]).all()
    assert row["display.contrast"] == pytest.approx(0.5)


def planted_sweep(root: Path, shift: float) -> Path:
    """8 channels × 2 seeds × weight decay 0 / 0.1 as real job directories: raw brightness =
    0.4 + channel/seed offset + shift·[wd = 0.1] + small noise."""
    rng = np.random.default_rng(0)
    num = 0
    for channel in range(8):
        for seed in range(2):
            offset = rng.normal(0.0, 0.05)
            for wd in (0.0, 0.1):
                cfg = config(wd, seed)
                cfg["target"]["channel"] = channel
                job = root / str(num)
                hydra_files(job, num, [f"target.channel={channel}", f"seed={seed}",
                                       f"optimizer.weight_decay={wd}"], cfg)
                value = 0.4 + offset + (shift if wd else 0.0) + rng.normal(0.0, 0.005)
                write_job(job, outcome(np.full((H, W, 3), value)))
                num += 1
    return root


def test_planted_effect_in_real_job_directories_is_found(tmp_path: Path) -> None:
    claim = Claim("wd darker", "optimizer.weight_decay", "raw.brightness", "decrease")
    found = claims_table(collect(planted_sweep(tmp_path / "planted", -0.1)), [claim], n_boot=2000).iloc[0]
    assert found["verdict"] == "supported" and found["n_units"] == 8 and found["n_groups"] == 16
    assert found["effect"] == pytest.approx(-0.1, abs=0.005)
    assert 0.02 < found["min_effect"] < 0.1  # the seeds' offsets at fixed settings
    null = claims_table(collect(planted_sweep(tmp_path / "null", 0.0)), [claim], n_boot=2000).iloc[0]
    assert null["verdict"] == "negligible" and null["reason"].startswith("effect CI")


def test_report_defines_its_columns_and_flags_unconverged_claims(sweep: Path, tmp_path: Path) -> None:
    text = write_report(sweep, out_dir=tmp_path / "out", n_boot=200).read_text()
    assert "- `effect` (effect [95 % CI]): the same mean of the per-group change" in text
    for column in ("unit", "n_units", "min_effect", "verdict_holm", "monotone", "dropped", "reason"):
        assert f"- `{column}`" in text
    assert "Convergence: 0 of 4 job(s) with a trace converged" in text
    assert "| 4 unconverged |" in text  # the claim row's flag
    claims = pd.read_csv(tmp_path / "out" / "claims.csv")
    assert claims["n_unconverged"].max() == 4  # the weight-decay claim (the others: not in sweep)


def test_contact_sheet_wraps_a_long_row_and_claims_get_their_own_sheet(tmp_path: Path) -> None:
    from featsweep.analysis.figures import claim_sheet, contact_sheet

    for num in range(16):  # -m target.channel=range(0,16): one factor with 16 values
        cfg = config(0.0, 0)
        cfg["target"]["channel"] = num
        hydra_files(tmp_path / str(num), num, [f"target.channel={num}"], cfg)
        write_job(tmp_path / str(num), outcome(np.full((H, W, 3), 0.5)))
    df = collect(tmp_path)
    width, height = contact_sheet(df).get_size_inches()
    assert width < 14 and height > 2 * 1.5  # 4 × 4, not one 16-image row (> 24 in wide)
    sheet = claim_sheet(planted := collect(planted_sweep(tmp_path / "p", -0.1)),
                        Claim("wd", "optimizer.weight_decay", "raw.brightness", "decrease"))
    axes = [ax for ax in sheet.axes if ax.images]
    assert len(axes) == 32 and len(planted) == 32  # 2 levels (columns) × 16 groups (rows)
    assert len(sheet.axes) == 32


def test_activation_plot_legend_is_by_factor_not_by_job(tmp_path: Path) -> None:
    from featsweep.analysis.figures import activation_curves

    num = 0
    for wd in (0.0, 0.1):
        for seed in range(7):
            hydra_files(tmp_path / str(num), num, [f"optimizer.weight_decay={wd}", f"seed={seed}"],
                        config(wd, seed))
            write_job(tmp_path / str(num), outcome(np.full((H, W, 3), 0.5)))
            num += 1
    fig = activation_curves(collect(tmp_path))
    ax = fig.axes[0]
    assert len(ax.lines) == 14
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "optimizer.weight_decay=0.0", "optimizer.weight_decay=0.1"]
    assert len({line.get_color() for line in ax.lines}) == 2  # one colour per setting


def test_saved_table_rebuilds_the_committed_study_claims() -> None:
    """docs/study/runs.parquet (the committed study) goes through the claims again: one row per
    claim and parameterization, each from 8 channel units, with the committed statistics."""
    from featsweep.analysis.claims import load_claims, notes_claims_path
    from featsweep.analysis.report import load_table

    df = load_table(ROOT / "docs" / "study" / "runs.parquet")
    table = claims_table(df, load_claims(notes_claims_path()), n_boot=500)
    committed = pd.read_csv(ROOT / "docs" / "study" / "claims.csv")
    assert len(table) == 26 and (table["verdict"] != NOT_IN_SWEEP).all()
    assert table["claim"].tolist() == committed["claim"].tolist()
    assert (table["n_units"] == 8).all() and (table["n_groups"] == 16).all()
    # The point estimates do not depend on the resamples: they are the committed ones.
    np.testing.assert_allclose(table["statistic"], committed["statistic"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(table["effect"], committed["effect"], rtol=1e-9, atol=1e-12)
    # "Weight decay darkens" holds for the notes' parameterization and reverses for the peers'.
    darker = table.set_index("claim")["statistic"]
    assert darker["More weight decay gives darker pixels [param.kind=pixel]"] < -0.8
    assert darker["More weight decay gives darker pixels [param.kind=fft]"] > 0


def test_analysis_house_report_uses_public_claims_api_and_modules_stay_small() -> None:
    """report/figures import only names the claims module exports; each module reads in a sitting."""
    import ast

    import featsweep.analysis.claims as claims_module

    package = ROOT / "src" / "featsweep" / "analysis"
    for name in ("report.py", "figures.py", "factors.py"):
        tree = ast.parse((package / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("featsweep.analysis"):
                for alias in node.names:
                    assert not alias.name.startswith("_"), (name, node.module, alias.name)
                    if node.module == "featsweep.analysis.claims":
                        assert alias.name in claims_module.__all__, (name, alias.name)
    for path in package.glob("*.py"):
        assert len(path.read_text().splitlines()) <= 520, path.name


def test_flagged_ok_jobs_are_listed(sweep: Path, tmp_path: Path) -> None:
    """The app flags a finished job whose activation did not rise (result.json flag)."""
    result = json.loads((sweep / "2" / "result.json").read_text())
    result.update(flag="not_rising", flag_message="the activation did not rise (0.02 -> 0)")
    (sweep / "2" / "result.json").write_text(json.dumps(result))
    text = write_report(sweep, out_dir=tmp_path / "out", n_boot=200).read_text()
    assert "1 finished job(s) are flagged" in text
    assert "| 2 | optimizer.weight_decay=0.1, seed=0 | not_rising | the activation did not rise (0.02 -> 0) |" in text
