"""Hydra finds ``hydra/launcher=batched`` in an editable install and in a normal one.

Hydra 1.3 discovers launchers by scanning the ``hydra_plugins`` namespace package; an install
that hides the package behind an import hook (some PEP 660 editable installs), or a
``hydra_plugins/__init__.py`` that turns the namespace into a regular package, makes the plugin
(or other plugins) silently disappear. See docs/CONTRACTS.md, "Hydra plugin discovery".
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import pytest
from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from hydra.plugins.launcher import Launcher

REPO = Path(__file__).resolve().parents[1]
PLUGIN_MODULE = "hydra_plugins.featsweep_batched_launcher.batched_launcher"

# Run in a fresh interpreter: discover the launchers, report where each class was loaded from.
DISCOVER = r"""
import inspect, json, sys
from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from hydra.plugins.launcher import Launcher
import featsweep

launchers = {f"{c.__module__}.{c.__qualname__}": inspect.getfile(c)
             for c in Plugins.instance().discover(Launcher)}
node = ConfigStore.instance().load("hydra/launcher/batched.yaml").node
print(json.dumps({"launchers": launchers, "featsweep": featsweep.__file__, "sys_path": sys.path,
                  "target": node["_target_"], "max_batch": node["max_batch"]}))
"""


def discover_in_subprocess(cwd: Path, *python_flags: str,
                           env: dict[str, str] | None = None) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, *python_flags, "-c", DISCOVER], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def is_under(path: str | Path, root: Path) -> bool:
    return Path(path).resolve().is_relative_to(root.resolve())


def other_plugin_launchers() -> list[str]:
    """Launchers of other installed Hydra plugins that must stay discoverable next to ours."""
    try:
        importlib.metadata.distribution("hydra-submitit-launcher")
    except importlib.metadata.PackageNotFoundError:
        return []
    return ["hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"]


def check_discovered(found: dict[str, Any], root: Path) -> None:
    """`found` (from DISCOVER) has our launcher loaded from under `root`, and the others too."""
    launchers = found["launchers"]
    key = f"{PLUGIN_MODULE}.BatchedLauncher"
    assert key in launchers, f"BatchedLauncher not discovered; found {sorted(launchers)}"
    assert is_under(launchers[key], root), f"{launchers[key]} is not under {root}"
    assert is_under(found["featsweep"], root), f"{found['featsweep']} is not under {root}"
    assert found["target"] == f"{PLUGIN_MODULE}.BatchedLauncher" and found["max_batch"] >= 1
    assert "hydra._internal.core_plugins.basic_launcher.BasicLauncher" in launchers
    for other in other_plugin_launchers():  # our plugin must not shadow the namespace
        assert other in launchers, f"{other} went missing; found {sorted(launchers)}"


def test_discovery() -> None:
    """In this interpreter (as Hydra's own plugin tests check)."""
    from hydra_plugins.featsweep_batched_launcher.batched_launcher import BatchedLauncher

    found = {f"{c.__module__}.{c.__qualname__}" for c in Plugins.instance().discover(Launcher)}
    assert f"{BatchedLauncher.__module__}.{BatchedLauncher.__qualname__}" in found
    node = ConfigStore.instance().load("hydra/launcher/batched.yaml").node
    assert node["_target_"] == f"{PLUGIN_MODULE}.BatchedLauncher"


def test_discovery_in_the_editable_install(tmp_path: Path) -> None:
    """`pip install -e .` of this checkout: a fresh interpreter finds the plugin under src/."""
    try:
        dist = importlib.metadata.distribution("featsweep")
        direct_url = json.loads(dist.read_text("direct_url.json") or "{}")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("featsweep is not installed")
    if not direct_url.get("dir_info", {}).get("editable"):
        pytest.skip("featsweep is not installed in editable mode (the slow test covers this case)")
    if not direct_url.get("url", "").startswith("file://") or \
            Path(direct_url["url"].removeprefix("file://")).resolve() != REPO:
        pytest.skip(f"the editable install points at {direct_url.get('url')}, not {REPO}")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    check_discovered(discover_in_subprocess(tmp_path, env=env), REPO / "src")


def copy_project(dest: Path) -> Path:
    """The buildable part of the working tree (src/, top-level files), without build leftovers."""
    dest.mkdir()
    for item in REPO.iterdir():
        if item.is_file():
            shutil.copy2(item, dest / item.name)
    shutil.copytree(REPO / "src", dest / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc"))
    return dest


@pytest.mark.slow
def test_discovery_in_a_normal_install(tmp_path: Path) -> None:
    """A non-editable install into a fresh directory, run with ``python -S`` (so the editable
    install's .pth file is not processed): the plugin is found there, and a sweep uses it."""
    project = copy_project(tmp_path / "project")
    target = tmp_path / "site"
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(target), str(project)],
        capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stdout[-2000:] + pip.stderr[-2000:]
    plugin_dir = target / "hydra_plugins" / "featsweep_batched_launcher"
    assert (plugin_dir / "batched_launcher.py").is_file()
    assert not (target / "hydra_plugins" / "__init__.py").exists(), \
        "hydra_plugins must stay a namespace package"
    assert (target / "featsweep" / "conf" / "config.yaml").is_file()

    # The interpreter's own packages (hydra, torch, ...), but not the .pth files in them.
    site_dirs = dict.fromkeys([str(target), sysconfig.get_paths()["purelib"],
                               sysconfig.get_paths()["platlib"]])
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(PYTHONPATH=os.pathsep.join(site_dirs), PYTHONNOUSERSITE="1", OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1")
    found = discover_in_subprocess(tmp_path, "-S", env=env)
    assert not any(is_under(p, REPO) for p in found["sys_path"] if p), found["sys_path"]
    check_discovered(found, target)

    # The default launcher of the installed app is the batched one, and it runs.
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, "-S", "-m", "featsweep", "-m", "seed=0,1", "model=tiny", "image.size=16",
         "steps=2", "device=cpu", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "Batched 2 jobs into 1 batch" in out
    for job in ("0", "1"):
        result = json.loads((sweep / job / "result.json").read_text())
        assert result["status"] == "ok" and result["batch_size"] == 2
