"""The console entry points ``featsweep`` and ``featsweep-analysis`` from a normal install.

A non-editable ``pip install --target`` of a copy of this checkout, run with ``python -S`` (so
the editable install's .pth file is not processed) and PYTHONPATH = that directory + the
interpreter's own site-packages: the installed scripts run a sweep and its analysis, and they
use the installed package, not this checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _copy_project(dest: Path) -> Path:
    dest.mkdir(parents=True)
    for item in REPO.iterdir():
        if item.is_file():
            shutil.copy2(item, dest / item.name)
    shutil.copytree(REPO / "src", dest / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc"))
    return dest


@pytest.mark.slow
def test_featsweep_and_featsweep_analysis_scripts_from_a_normal_install(tmp_path: Path) -> None:
    target = tmp_path / "site"
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(target), str(_copy_project(tmp_path / "project"))],
        capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stdout[-2000:] + pip.stderr[-2000:]
    scripts = {name: target / "bin" / name for name in ("featsweep", "featsweep-analysis")}
    for name, script in scripts.items():
        assert script.is_file(), f"pip wrote no {name} script: {sorted(target.iterdir())}"
    assert "featsweep.__main__" in scripts["featsweep"].read_text()
    assert "featsweep.analysis.__main__" in scripts["featsweep-analysis"].read_text()

    site = dict.fromkeys([str(target), sysconfig.get_paths()["purelib"],
                          sysconfig.get_paths()["platlib"]])
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(PYTHONPATH=os.pathsep.join(site), PYTHONNOUSERSITE="1", OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-S", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)

    where = run("-c", "import featsweep; print(featsweep.__file__)")
    assert where.returncode == 0 and Path(where.stdout.strip()).is_relative_to(target), \
        where.stdout + where.stderr

    sweep = tmp_path / "sweep"
    proc = run(str(scripts["featsweep"]), "-m", "seed=0,1", "model=tiny", "image.size=16",
               "steps=2", "device=cpu", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert sorted(p.parent.name for p in sweep.glob("*/result.json")) == ["0", "1"]

    proc = run(str(scripts["featsweep-analysis"]), str(sweep))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (sweep / "analysis" / "report.md").is_file()
    assert (sweep / "analysis" / "report.html").is_file()

    bad = run(str(scripts["featsweep-analysis"]), str(tmp_path / "nowhere"))
    assert bad.returncode == 2 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr
