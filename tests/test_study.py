"""The study's commands (`experiment=claims`, its GPU twin `experiment=claims_full`), checked on
the CPU: the full plan as a dry run, and a one-seed cut of the GPU study run at toy size.

The study committed under docs/study/ ran on the CPU (`experiment=claims`); its GPU twin is
`python -m featsweep experiment=claims_full device=cuda` then `python -m featsweep.analysis DIR`.
No GPU is lent to every session, so the GPU study's plan is checked with --dry-run (every job
composed, nothing run), and its sweep is run with one seed, 2 steps at 32 px: every claim of the
notes gets one verdict per parameterization, from 10 channel units.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from _cli import run_module

pytestmark = pytest.mark.slow

ARMS = 16  # conf/study/*.yaml
PARAMETERIZATIONS = 2  # conf/parameterization/*.yaml


def test_the_study_plans_are_every_arm_under_both_parameterizations(tmp_path: Path) -> None:
    for experiment, seeds, channels in (("claims", 2, 8), ("claims_full", 3, 10)):
        proc = run_module("featsweep", f"experiment={experiment}", "--dry-run", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        jobs = ARMS * PARAMETERIZATIONS * seeds * channels
        assert f"featsweep dry run: {jobs} job(s)" in proc.stdout, proc.stdout[:2000]
        lines = [line for line in proc.stdout.splitlines() if re.match(r"\s+#\d+:", line)]
        assert len(lines) == jobs
        assert sum("+parameterization=peers" in line for line in lines) == jobs // 2
        assert sum("+study=gauss_5" in line for line in lines) == jobs // ARMS
    assert len(list((Path(__file__).resolve().parents[1] / "conf" / "study").glob("*.yaml"))) == ARMS


def test_claims_full_cut_to_one_seed_gives_a_verdict_per_parameterization(tmp_path: Path) -> None:
    sweep = tmp_path / "full"
    proc = run_module("featsweep", "experiment=claims_full", "device=cpu", "steps=2",
                      "image.size=32", "hydra.sweeper.params.seed=0", f"hydra.sweep.dir={sweep}",
                      cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert len(jobs) == ARMS * PARAMETERIZATIONS * 10
    assert {json.loads((j / "result.json").read_text())["status"] for j in jobs} == {"ok"}

    proc = run_module("featsweep.analysis", str(sweep), cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    claims = pd.read_csv(sweep / "analysis" / "claims.csv")
    runs = pd.read_csv(sweep / "analysis" / "runs.csv")
    assert len(runs) == len(jobs) and set(runs["image.size"]) == {32} and set(runs["steps"]) == {2}
    # The GPU study's lr is the notes' for both parameterizations (a sweep override).
    assert set(runs["optimizer.lr"]) == {0.01}
    assert set(runs.loc[runs["target.relu"] == "pre", "target.layer"]) == {"_blocks.8._bn1"}
    # 13 claims x 2 parameterizations, each from 10 channels x 1 seed.
    assert len(claims) == 26
    for kind in ("pixel", "fft"):
        part = claims[claims["claim"].str.endswith(f"[param.kind={kind}]")]
        assert len(part) == 13, claims["claim"].tolist()
        assert set(part["n_units"]) == {10} and set(part["n_groups"]) == {10}, part[["claim", "n_groups"]]
