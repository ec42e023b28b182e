"""Smoke test of benchmarks/bench_speed.py: `--quick` runs end to end and prints every row.

No timing assertions (CI machines are shared and noisy): only that each method produced a
positive, finite ms-per-image-step figure and the sweep estimate lines are there.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_speed.py"


def _number(cell: str) -> float:
    return float(cell.replace("×", "").strip())


@pytest.mark.skipif(importlib.util.find_spec("cv2") is None,
                    reason="the notes' loop needs OpenCV (opencv-python-headless, in the dev extra)")
def test_quick_bench_prints_every_method(tmp_path: Path) -> None:
    out_json = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--json", str(out_json)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    has_lucent = importlib.util.find_spec("lucent") is not None
    table = proc.stdout
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[1].isdigit():
            rows[(cells[0], int(cells[1]))] = cells
    expected = [("floor: truncated fwd + input grad (NCHW)", 1),
                ("floor, channels-last", 1),
                ("Lucent render_vis defaults (fft + standard transforms)", 1),
                ("featsweep batched, fft + standard transforms", 4),
                ("notes' loop (full fwd, cv2 blur, opt rebuilt)", 1),
                ("Lucent render_vis (pixel param, no transforms)", 1),
                ("featsweep run_batch, B=1", 1),
                ("featsweep run_batch, batched (per-image hp)", 4),
                ("floor: truncated fwd + input grad (NCHW)", 4),
                ("floor, channels-last", 4)]
    assert [k for k in expected if k not in rows] == [], table + proc.stderr
    for key in expected:
        cells = rows[key]
        ratio_cl = _number(cells[5])
        assert math.isfinite(ratio_cl) and ratio_cl > 0, cells
        if key[0].startswith("Lucent") and not has_lucent:
            assert cells[2].startswith("failed"), cells  # reported, not silently dropped
            continue
        ms = _number(cells[2])
        assert math.isfinite(ms) and ms > 0, cells
        ratio = _number(cells[4])
        assert math.isfinite(ratio) and ratio > 0, cells
        if has_lucent:
            speedup = _number(cells[3])
            assert math.isfinite(speedup) and speedup > 0, cells
    assert proc.returncode == (0 if has_lucent else 1), proc.stderr
    assert re.search(r"featsweep basic \(12 × B=1\): [\d.]+ (s|min|h)", table), table
    assert "featsweep batched (one B=12 batch): not measured" in table  # --quick runs B=4 only
    data = json.loads(out_json.read_text())
    assert data["meta"]["model"] == "tiny" and data["meta"]["torch"]
    assert {r["method"] for r in data["rows"]} == {"floor", "floor_cl", "notes", "lucent",
                                                   "featsweep", "batched", "lucent_fft", "fft"}
    assert "fft + standard transforms / pixel path (batched) at B=4" in table


def test_step_parts_bench_prints_every_row() -> None:
    """benchmarks/bench_step_parts.py at smoke size: every pair it promises, with a ratio."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_step_parts.py"),
                           "--batch", "2", "--size", "32", "--reps", "2", "--threads", "1"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "x |" in line]
    names = " ".join(rows)
    for piece in ("ReLU6 forward", "ReLU6 gradient", "half SGD, half Adam", "all SGD",
                  "all Adam", "finite check", "blur"):
        assert piece in names, piece
    assert len(rows) == 9


def test_launcher_bench_prints_per_job_rows_and_profiles() -> None:
    """benchmarks/bench_launcher.py at smoke size: a row per sweep size with both per-job
    figures; --profile prints cProfile's table (the sweep must not end the process first)."""
    script = str(ROOT / "benchmarks" / "bench_launcher.py")
    proc = subprocess.run([sys.executable, script, "--n", "1", "3", "--rounds", "1"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines()
            if re.match(r"\| \d+ \|", line)]
    assert [int(r[0]) for r in rows] == [1, 3]
    wall_1, cpu_1 = float(rows[0][1]), float(rows[0][3])
    assert wall_1 > 0 and cpu_1 > 0
    per_wall, per_cpu = float(rows[1][2]), float(rows[1][4])  # may be < 0: noise at 3 jobs
    assert math.isfinite(per_wall) and math.isfinite(per_cpu)
    prof = subprocess.run([sys.executable, script, "--profile", "2"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert prof.returncode == 0, prof.stderr[-2000:]
    assert "function calls" in prof.stdout and "launch" in prof.stdout
