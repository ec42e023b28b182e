"""The launcher's sweep loader gives every job the config Hydra itself composes, leaf for leaf."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.types import RunMode
from omegaconf import OmegaConf, open_dict

from _hydra import featsweep_conf
from hydra_plugins.featsweep_batched_launcher.sweep_loader import FREEZE_EVERY, SweepConfigLoader

# Sweeps as lists of per-job override lists: group choices (plain, appended, nested, under
# hydra/), plain values of every override kind Hydra has, and their mixes in any order.
SWEEPS = {
    "values": [[f"seed={s}", f"target.channel={c}"] for s in (0, 1) for c in (7, 33)],
    "groups and values": [["optimizer=adam", "optimizer.lr=0.5", "seed=1"],
                          ["optimizer=sgd", "optimizer.lr=0.5", "seed=1"],
                          ["seed=2", "optimizer=adam"], ["blur=gaussian", "blur.k=7"]],
    "appended groups": [["+parameterization=peers", "+study=wd_1e-1", "target.channel=3"],
                        ["+parameterization=notes", "+study=relu_pre", "target.channel=3"],
                        ["+parameterization=notes", "+study=relu_pre", "target.channel=97"],
                        ["experiment=claims", "+study=adam", "seed=1", "+parameterization=peers"]],
    "value kinds": [["+extra=1", "++steps=5", "~target.relu_gradient", "image={size: 64}"],
                    ["target.channel=4", "image.size=${steps}", "optimizer.betas=[0.8,0.9]"],
                    ["param=fft", "param.decay=1.5", "transform=standard", "transform.jitter=4"]],
    "hydra overrides": [["hydra.job.name=other", "seed=1"], ["hydra/launcher=basic", "seed=2"],
                        ["hydra.job.config.override_dirname.item_sep=+", "seed=3", "steps=4"]],
}


def loaded_master(loader) -> object:
    return loader.load_configuration("config", ["hydra.sweep.dir=/tmp/featsweep-test-sweep"],
                                     RunMode.MULTIRUN)


@pytest.mark.parametrize("name", sorted(SWEEPS))
def test_every_job_config_equals_hydras_own(name: str) -> None:
    with featsweep_conf():
        hydra_loader = GlobalHydra.instance().config_loader()
        master = loaded_master(hydra_loader)
        fast = SweepConfigLoader(hydra_loader)
        for overrides in SWEEPS[name]:
            ours = fast.load_sweep_config(master, list(overrides))
            theirs = hydra_loader.load_sweep_config(master, list(overrides))
            assert OmegaConf.to_container(ours, resolve=False) == \
                OmegaConf.to_container(theirs, resolve=False), overrides
            assert OmegaConf.to_yaml(ours) == OmegaConf.to_yaml(theirs)  # the files run_job writes
            assert OmegaConf.is_struct(ours) and not OmegaConf.is_readonly(ours.hydra)
        assert fast.stats["fallback"] == 0, fast.stats


def test_one_hydra_composition_per_group_choice_and_every_job_its_own_object() -> None:
    with featsweep_conf():
        hydra_loader = GlobalHydra.instance().config_loader()
        master = loaded_master(hydra_loader)
        fast = SweepConfigLoader(hydra_loader)
        jobs = [[f"optimizer={o}", f"seed={s}"] for o in ("sgd", "adam") for s in range(10)]
        first = [fast.load_sweep_config(master, j) for j in jobs]  # the sweeper's check
        again = [fast.load_sweep_config(master, j) for j in jobs]  # the launcher
        # Per group choice: its structural config, then the first job in full (the check).
        assert fast.stats == {"full": 4, "fast": 40, "fallback": 0}
        assert not any(a is b for a, b in zip(first, again))
        assert [c.seed for c in again] == list(range(10)) * 2
        assert {c.optimizer.name for c in again[10:]} == {"adam"}
        # Each job is its own copy: changing one leaves the others (and a repeat) alone, as
        # when a sweep runs the same overrides twice (seed=1,1; Optuna's repeated trials).
        again[0].seed = 99
        assert again[1].seed == 1 and fast.load_sweep_config(master, jobs[0]).seed == 0
        assert first[0].seed == 0


def test_kept_configs_are_moved_out_of_the_cycle_collectors_walks() -> None:
    """Every FREEZE_EVERY configs kept, gc.freeze(): the collector's full passes skip them (the
    launcher unfreezes when its launch ends: tests/test_launcher.py)."""
    gc.unfreeze()
    try:
        with featsweep_conf():
            hydra_loader = GlobalHydra.instance().config_loader()
            master = loaded_master(hydra_loader)
            fast = SweepConfigLoader(hydra_loader)
            configs = [fast.load_sweep_config(master, [f"seed={s}"])
                       for s in range(FREEZE_EVERY - 1)]
            assert gc.get_freeze_count() == 0
            configs.append(fast.load_sweep_config(master, [f"seed={FREEZE_EVERY}"]))
            assert gc.get_freeze_count() > 0
            # A config is an object the collector tracks, yet it is in none of the generations
            # its passes walk (gc.get_objects() leaves out the frozen ones).
            assert gc.is_tracked(configs[0])
            assert all(o is not configs[0] for o in gc.get_objects())
    finally:
        gc.unfreeze()


def test_the_masters_resolver_cache_is_copied_per_job_as_hydra_does() -> None:
    with featsweep_conf():
        hydra_loader = GlobalHydra.instance().config_loader()
        master = loaded_master(hydra_loader)
        fast = SweepConfigLoader(hydra_loader)
        fast.load_sweep_config(master, ["seed=1"])  # the structural config exists now
        with open_dict(master):
            master.probe = "${now:%H%M%S%f}"
        value = master.probe  # ${now:...} cached in the master after the base was built
        for cfg in (fast.load_sweep_config(master, ["seed=2"]),
                    hydra_loader.load_sweep_config(master, ["seed=2"])):
            with open_dict(cfg):
                cfg.probe = "${now:%H%M%S%f}"
            assert cfg.probe == value  # the job resolves it from the copied cache


@pytest.mark.parametrize("overrides, error", [
    (["optimizer=nosuch"], MissingConfigException),
    (["no_such_key=1"], ConfigCompositionException),
    (["optimizer.no_such_key=1"], ConfigCompositionException),
])
def test_errors_are_hydras_own(overrides, error) -> None:
    with featsweep_conf():
        hydra_loader = GlobalHydra.instance().config_loader()
        master = loaded_master(hydra_loader)
        with pytest.raises(error) as theirs:
            hydra_loader.load_sweep_config(master, overrides)
        fast = SweepConfigLoader(hydra_loader)
        fast.load_sweep_config(master, ["seed=1"])  # the structural config is cached first
        with pytest.raises(error) as ours:
            fast.load_sweep_config(master, overrides)
        assert str(ours.value) == str(theirs.value)


def test_a_difference_from_hydra_sends_the_group_back_to_hydra(monkeypatch) -> None:
    """If the fast path ever disagreed with Hydra (a future Hydra, an override kind it does not
    know), the first job of the group shows it and the whole group is composed by Hydra."""
    with featsweep_conf():
        hydra_loader = GlobalHydra.instance().config_loader()
        master = loaded_master(hydra_loader)
        fast = SweepConfigLoader(hydra_loader)
        real_apply = SweepConfigLoader._apply

        def wrong(base, parsed, values):
            cfg = real_apply(base, parsed, values)
            cfg.steps = -1
            return cfg

        monkeypatch.setattr(SweepConfigLoader, "_apply", staticmethod(wrong))
        configs = [fast.load_sweep_config(master, [f"seed={s}"]) for s in range(3)]
        assert [c.steps for c in configs] == [300, 300, 300]
        assert fast.stats["fast"] == 0 and fast.stats["fallback"] == 1


@pytest.mark.parametrize("subdir, needs", [
    (None, False),                                # Hydra's default: ${hydra.job.num}
    ("run_${seed}_${hydra.job.num}", False),
    ("${hydra:job.num}_x", True),                 # the resolver reads Hydra's singleton
    ("${oc.env:FEATSWEEP_TEST_SUBDIR,none}", False),  # OmegaConf's own: never the singleton
])
def test_job_dir_is_run_jobs_dir_with_or_without_the_singleton(subdir, needs) -> None:
    from hydra.core.hydra_config import HydraConfig

    from hydra_plugins.featsweep_batched_launcher._plan import needs_hydra_singleton, output_dir

    with featsweep_conf():
        hydra_loader = GlobalHydra.instance().config_loader()
        master = loaded_master(hydra_loader)
        extra = [] if subdir is None else [f"hydra.sweep.subdir={subdir}"]
        cfg = SweepConfigLoader(hydra_loader).load_sweep_config(master, ["seed=3", *extra])
        from omegaconf import open_dict
        with open_dict(cfg):
            cfg.hydra.job.num = 5
            cfg.hydra.job.id = 5
        assert needs_hydra_singleton(cfg, "hydra.sweep.subdir") is needs
        before = HydraConfig.instance().cfg
        ours = output_dir(cfg)
        assert HydraConfig.instance().cfg is before  # left as it was
        HydraConfig.instance().set_config(cfg)  # what run_job does, then it selects the keys
        expected = Path(str(OmegaConf.select(cfg, "hydra.sweep.dir")),
                        str(OmegaConf.select(cfg, "hydra.sweep.subdir"))).resolve()
        assert ours == expected
        assert ours.name == {None: "5", "run_${seed}_${hydra.job.num}": "run_3_5",
                             "${hydra:job.num}_x": "5_x"}.get(subdir, "none")
