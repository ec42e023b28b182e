"""benchmarks/gpu_check.sh works before a GPU is lent: its CPU dry run (tiny sizes) runs every
step and writes the tables a device run would."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(FEATSWEEP_GPU_CHECK_DRY="1", OMP_NUM_THREADS="1", PYTHON="python3")
    env["PATH"] = os.environ.get("PATH", "")
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=600)
    summary = (tmp_path / "summary.md").read_text()
    assert proc.returncode == 0, summary + proc.stderr[-2000:]
    for name in ("gpu_tests", "inception_eager", "notes_sweep"):
        assert f"== {name}" in summary
    assert "rc=0" in summary and "status 0" in summary
    bench = json.loads((tmp_path / "inception_eager.json").read_text())
    methods = {r["method"] for r in bench["rows"] if r["ms_per_image_step"]}
    assert {"floor", "floor_cl", "batched", "fft", "lucent", "lucent_fft", "notes"} <= methods
    results = sorted((tmp_path / "seed_notes").glob("*/result.json"))
    assert len(results) == 12
    assert "notes' 12-run sweep wall time" in summary
