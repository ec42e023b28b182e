"""Job configs of a sweep, composed once per distinct set of config-group choices.

Hydra composes every job of a sweep from scratch, twice: the sweeper checks each job's overrides
(``Sweeper.validate_batch_is_legal``) and the launcher composes them again. A full composition
re-reads and merges every YAML file of the defaults tree (~80 ms per job on a laptop core), so a
1,000-job sweep spent minutes before its first step. Yet most jobs of a sweep differ from each
other only in plain values (``seed=3``, ``target.channel=7``), which Hydra applies *after* the
defaults tree is composed (``ConfigLoaderImpl._load_configuration_impl``).

:class:`SweepConfigLoader` wraps Hydra's loader behind the public
:class:`~hydra.core.config_loader.ConfigLoader` interface. For a job it splits the overrides into
the *structural* ones (``hydra.*`` and config-group choices such as ``optimizer=adam``,
``+study=base``) and the plain values. The structural part is composed by Hydra once per distinct
tuple; a job is a copy of that config with its values applied the way Hydra applies them, and
Hydra's per-job bookkeeping (``hydra.overrides.task``, ``hydra.job.override_dirname``) set to the
job's own. The first job of every structural tuple is also composed by Hydra in full and the two
configs are compared leaf for leaf; any difference (or any error in the fast path) sends that
tuple back to Hydra's own composition for good. So a job's config, and every file written from it,
is what Hydra would have composed (tests/test_sweep_loader.py compares whole sweeps).

Two costs are left per job, and both are cut:

- the copy of the structural config: a pickle of it is kept, and each job is a fresh object
  unpickled from it (~5x cheaper than ``copy.deepcopy`` of a DictConfig; flags, node types and
  the structured ``hydra`` node survive a pickle as they survive a deep copy);
- the second composition: Hydra's sweepers check a batch (``validate_batch_is_legal``) by
  composing each job and dropping the result, then the launcher composes the same jobs. Each
  config this loader composes is also kept, once, for :meth:`take`, which the batched launcher
  calls instead of composing again; :meth:`forget` drops what no launcher took.

A third cost is Python's cycle collector: a sweep's configs live until its end (a few hundred
OmegaConf nodes each, every node in reference cycles with its parent), and each full collection
walks all of them again, ~0.3 s a pass at 1,000 jobs. Every :data:`FREEZE_EVERY` configs this
loader keeps are moved out of the collector's reach (``gc.freeze``); the launcher gives them
back (``gc.unfreeze``, :func:`hydra_plugins.featsweep_batched_launcher._sweep.launch`) when its
launch ends, so a later launch in the same process (an Optuna search) collects them as usual.
"""

from __future__ import annotations

import gc
import logging
import pickle
from typing import Any, List, Optional

from hydra._internal.config_loader_impl import ConfigLoaderImpl, get_overrides_dirname
from hydra.core.config_loader import ConfigLoader
from hydra.core.object_type import ObjectType
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.plugins.config_source import ConfigSource
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)

__all__ = ["SweepConfigLoader", "install"]

FREEZE_EVERY = 64  # configs kept between two gc.freeze() calls (module docstring)



class SweepConfigLoader(ConfigLoader):
    """Hydra's ``ConfigLoader`` with a fast :meth:`load_sweep_config` (module docstring).

    Every other method is Hydra's own. ``stats`` counts ``full`` (Hydra compositions made),
    ``fast`` (jobs built from a composed structural config) and ``fallback`` (jobs sent back to
    Hydra because the fast path differed or failed). Each call returns a new config object.
    """

    def __init__(self, inner: ConfigLoader) -> None:
        self.inner = inner
        self._parser = OverridesParser.create()
        self._bases: dict[tuple, bytes | None] = {}  # pickled; None: this tuple uses Hydra's path
        self._composed: dict[tuple, list[DictConfig]] = {}  # for take(): (master, overrides)
        self._groups: dict[str, frozenset[str]] = {}
        # Each override string parsed once (Hydra's parser costs ~0.3 ms a string, and a grid
        # sweep repeats its strings across jobs); Overrides are only read after parsing.
        self._parsed: dict[str, Override] = {}
        self._kept_since_freeze = 0
        self.stats = {"full": 0, "fast": 0, "fallback": 0}

    def __getstate__(self) -> dict[str, Any]:
        # A submitit task pickles the launcher with its context: ship Hydra's loader only (the
        # parser does not pickle; the composed bases are rebuilt on demand where the task runs).
        return {"inner": self.inner}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["inner"])

    # ---- Hydra's loader, unchanged
    def load_configuration(self, config_name: Optional[str], overrides: List[str],
                           run_mode: RunMode, from_shell: bool = True,
                           validate_sweep_overrides: bool = True) -> DictConfig:
        return self.inner.load_configuration(config_name, overrides, run_mode, from_shell,
                                             validate_sweep_overrides)

    def get_search_path(self) -> Any:
        return self.inner.get_search_path()

    def get_sources(self) -> List[ConfigSource]:
        return self.inner.get_sources()

    def list_groups(self, parent_name: str) -> List[str]:
        return self.inner.list_groups(parent_name)

    def get_group_options(self, group_name: str, results_filter: Optional[ObjectType] = ObjectType.CONFIG,
                          config_name: Optional[str] = None,
                          overrides: Optional[List[str]] = None) -> List[str]:
        return self.inner.get_group_options(group_name, results_filter, config_name, overrides)

    def compute_defaults_list(self, config_name: Optional[str], overrides: List[str],
                              run_mode: RunMode) -> Any:
        return self.inner.compute_defaults_list(config_name, overrides, run_mode)

    # ---- the fast path
    def load_sweep_config(self, master_config: DictConfig, sweep_overrides: List[str]) -> DictConfig:
        # Every call composes anew (each job its own object: the launcher writes hydra.job.num
        # into it, and a sweep may repeat a job's overrides, e.g. Optuna's repeated trials).
        cfg = self._compose(master_config, sweep_overrides)
        # Kept for the launcher's take(): the caller that composed it (a sweeper's check) drops
        # its result; a second copy would cost what take() saves.
        self._composed.setdefault((id(master_config), tuple(sweep_overrides)), []).append(cfg)
        self._kept_since_freeze += 1
        if self._kept_since_freeze >= FREEZE_EVERY:  # long-lived: out of the collector's walks
            gc.freeze()
            self._kept_since_freeze = 0
        return cfg

    def take(self, master_config: DictConfig, sweep_overrides: List[str]) -> DictConfig:
        """The launcher's composition of a job: the config an earlier
        :meth:`load_sweep_config` call (the sweeper's check of the batch) composed for the same
        overrides and nobody took yet, else a new composition. Each config is taken once."""
        kept = self._composed.get((id(master_config), tuple(sweep_overrides)))
        if kept:
            return kept.pop(0)
        return self._compose(master_config, sweep_overrides)

    def forget(self) -> None:
        """Drop the configs composed but not taken (the launcher calls it after each launch)."""
        self._composed.clear()

    def _compose(self, master_config: DictConfig, sweep_overrides: List[str]) -> DictConfig:
        try:
            parsed = [self._parse(line) for line in sweep_overrides]
        except Exception:  # Hydra's own path raises the user-facing error
            return self._full(master_config, sweep_overrides)
        if any(o.is_sweep_override() for o in parsed):
            return self._full(master_config, sweep_overrides)
        is_structural = [o.is_hydra_override() or self._is_group_choice(o) for o in parsed]
        structural = [o for o, s in zip(parsed, is_structural) if s]
        values = [o for o, s in zip(parsed, is_structural) if not s]
        key = (id(master_config), tuple(o.input_line for o in structural))
        first = key not in self._bases
        if first:
            try:
                composed = self._full(master_config, [o.input_line for o in structural])
                self._bases[key] = pickle.dumps(composed, protocol=pickle.HIGHEST_PROTOCOL)
            except Exception:
                self._bases[key] = None  # e.g. a missing group option: Hydra reports it below
        base = self._bases[key]
        if base is None:
            return self._full(master_config, sweep_overrides)
        try:
            cfg = self._apply(base, parsed, values)
            # As Hydra does per job: the master's resolver cache (${now:...}) as it is now.
            OmegaConf.copy_cache(from_config=master_config, to_config=cfg)
        except Exception:
            self.stats["fallback"] += 1
            return self._full(master_config, sweep_overrides)
        if first:
            full = self._full(master_config, sweep_overrides)
            if OmegaConf.to_container(full, resolve=False) != OmegaConf.to_container(cfg, resolve=False):
                log.debug("sweep loader: fast composition differs for %s; using Hydra's", key[1])
                self._bases[key] = None
                self.stats["fallback"] += 1
                return full
        self.stats["fast"] += 1
        return cfg

    def _parse(self, line: str) -> Override:
        override = self._parsed.get(line)
        if override is None:
            (override,) = self._parser.parse_overrides([line])
            self._parsed[line] = override
        return override

    def _full(self, master_config: DictConfig, overrides: List[str]) -> DictConfig:
        self.stats["full"] += 1
        return self.inner.load_sweep_config(master_config, list(overrides))

    def _is_group_choice(self, override: Override) -> bool:
        # Hydra's rule (hydra._internal.defaults_list.Overrides): a config group's name whose
        # value is not a dict selects a config; anything else is a value applied after composing.
        parent, _, name = override.key_or_group.rpartition("/")
        if parent not in self._groups:
            self._groups[parent] = frozenset(self.inner.list_groups(parent))
        return name in self._groups[parent] and not isinstance(override.value(), dict)

    @staticmethod
    def _apply(base: bytes, parsed: List[Override], values: List[Override]) -> DictConfig:
        cfg = pickle.loads(base)
        ConfigLoaderImpl._apply_overrides_to_config(values, cfg)
        app = [o for o in parsed if not o.is_hydra_override()]
        with open_dict(cfg.hydra):
            cfg.hydra.overrides.task = [o.input_line for o in app]
            cfg.hydra.job.override_dirname = get_overrides_dirname(
                overrides=app,
                kv_sep=cfg.hydra.job.config.override_dirname.kv_sep,
                item_sep=cfg.hydra.job.config.override_dirname.item_sep,
                exclude_keys=cfg.hydra.job.config.override_dirname.exclude_keys,
            )
        return cfg


def install(hydra_context: Any) -> SweepConfigLoader:
    """Put a :class:`SweepConfigLoader` in ``hydra_context`` (shared by the sweeper that made
    the launcher, so its ``validate_batch_is_legal`` is fast too); idempotent."""
    loader = hydra_context.config_loader
    if not isinstance(loader, SweepConfigLoader):
        loader = SweepConfigLoader(loader)
        hydra_context.config_loader = loader
    return loader
