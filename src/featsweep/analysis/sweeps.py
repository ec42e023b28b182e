"""Which sweeps a folder holds, and which of each sweep's planned jobs are missing.

A *sweep* is a directory holding Hydra's ``multirun.yaml``; a job belongs to the nearest such
directory above it (or, without one, to its parent directory). A folder of several sweeps is
analysed as one table, and the report says so and lists each sweep's jobs (``job.sweep``).

Planned jobs: Hydra's basic sweeper expands ``hydra.sweeper.params`` (the config's sweep) and
then the command line's overrides (``hydra.overrides.task``) into the cartesian product of their
values; :func:`planned_jobs` does the same with Hydra's own override parser and
``BasicSweeper.split_arguments``, so a sweep killed with SIGKILL (jobs never started have no
directory) is reported as incomplete — "4 of 6 planned jobs have no directory" — never as a
smaller complete one. Other sweepers (Optuna, ...) choose their jobs as they go: no plan.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = ["MULTIRUN_FILE", "Plan", "missing_jobs", "planned_jobs", "sweep_of"]

MULTIRUN_FILE = "multirun.yaml"
_BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


@dataclass
class Plan:
    """A sweep's planned jobs.

    Attributes:
        sweep: the sweep directory.
        jobs: the planned jobs' override lists, in Hydra's job-number order (empty: unknown).
        note: why there is no plan ("" when there is one).
    """

    sweep: Path
    jobs: list[list[str]] = field(default_factory=list)
    note: str = ""


def sweep_of(job: Path, root: Path) -> Path:
    """The sweep directory of ``job``: the nearest directory at or above its parent, and at or
    below ``root``, that holds ``multirun.yaml``; else the job's parent (``root`` for a job
    that is ``root`` itself)."""
    job, root = job.resolve(), root.resolve()
    if job == root:
        return root
    here = job.parent
    while True:
        if (here / MULTIRUN_FILE).is_file():
            return here
        if here == root or root not in here.parents:
            return job.parent
        here = here.parent


def planned_jobs(sweep: Path) -> Plan:
    """The jobs Hydra's basic sweeper planned for ``sweep`` (from its ``multirun.yaml``)."""
    path = Path(sweep) / MULTIRUN_FILE
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        return Plan(Path(sweep), note=f"no readable {MULTIRUN_FILE} ({type(exc).__name__})")
    hydra: Any = data.get("hydra", {}) if isinstance(data, dict) else {}
    sweeper = hydra.get("sweeper", {}) if isinstance(hydra, dict) else {}
    target = sweeper.get("_target_", "") if isinstance(sweeper, dict) else ""
    if target != _BASIC_SWEEPER:
        return Plan(Path(sweep), note=f"the sweeper ({target or 'unknown'}) picks jobs as it goes")
    params = sweeper.get("params") or {}
    task = (hydra.get("overrides", {}) or {}).get("task") or []
    arguments = [f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}"
                 for k, v in params.items()] + [str(t) for t in task]
    try:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parsed = OverridesParser.create().parse_overrides(arguments)
        batches = BasicSweeper.split_arguments(parsed, None)
    except Exception as exc:  # a sweep Hydra itself could run, but not re-plan offline
        return Plan(Path(sweep), note=f"its overrides cannot be expanded here ({exc})")
    return Plan(Path(sweep), jobs=[list(job) for job in batches[0]])


def _key(overrides: Sequence[str]) -> frozenset[str]:
    return frozenset(str(o).strip() for o in overrides)


def missing_jobs(plan: Plan, on_disk: Sequence[Sequence[str]]) -> list[tuple[int, list[str]]]:
    """Planned jobs (number, overrides) that no job directory of the sweep holds.

    A job directory holds a planned job when its ``.hydra/overrides.yaml`` lists the same
    overrides (in any order).
    """
    have = {_key(o) for o in on_disk}
    return [(i, job) for i, job in enumerate(plan.jobs) if _key(job) not in have]
