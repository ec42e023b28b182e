"""The GPU study's one-line command (`experiment=claims_full`), run on the CPU at toy size.

The study committed under docs/study/ ran on the CPU (`experiment=claims`); its GPU twin is
`python -m featsweep experiment=claims_full device=cuda` then `python -m featsweep.analysis DIR`.
No GPU is lent to every session, so this runs the same two commands with 2 steps at 32 px: every
one of the 390 jobs completes, and each claim of the notes gets its 30 paired groups.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from _cli import run_module

pytestmark = pytest.mark.slow


def test_claims_full_at_toy_size_gives_30_groups_per_claim(tmp_path: Path) -> None:
    sweep = tmp_path / "full"
    proc = run_module("featsweep", "experiment=claims_full", "device=cpu", "steps=2",
                      "image.size=32", f"hydra.sweep.dir={sweep}", cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Batched 390 jobs into 7 batch(es)" in proc.stdout + proc.stderr
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 390
    statuses = {json.loads((j / "result.json").read_text())["status"] for j in jobs}
    assert statuses == {"ok"}

    proc = run_module("featsweep.analysis", str(sweep), cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    claims = pd.read_csv(sweep / "analysis" / "claims.csv")
    # 3 seeds x 10 channels, and every claim of the notes is testable in this sweep (but the
    # Gaussian-blur one, until the study has Gaussian arms).
    gaussian = claims["claim"].str.contains("Gaussian")
    assert len(claims) == 13 and (claims.loc[gaussian, "verdict"] == "not in this sweep").all()
    assert set(claims.loc[~gaussian, "n_groups"]) == {30}, claims[["claim", "n_groups"]]
    assert set(claims.loc[~gaussian, "n_units"]) == {10}  # channels: the unit resampled
    runs = pd.read_csv(sweep / "analysis" / "runs.csv")
    assert len(runs) == 390 and set(runs["image.size"]) == {32} and set(runs["steps"]) == {2}
