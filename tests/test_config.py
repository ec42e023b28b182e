"""Tests for conf/: every preset composes; seed_notes matches the notes key by key; no + needed."""

from __future__ import annotations

import itertools
from typing import Any, Iterator

import pytest
from hydra import compose
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from featsweep.spec import RunSpec, from_config

from _hydra import CONF, featsweep_conf

# Composing with version_base="1.3" changes Hydra global state that later tests (Hydra's own
# launcher suites) must not see.
pytestmark = pytest.mark.usefixtures("hydra_restore_singletons")

PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


@pytest.fixture(scope="module")
def hydra_conf() -> Iterator[None]:
    # Restore Hydra's singletons (version base included) after the module, not only after each
    # test: the per-test restore would otherwise put back the state this fixture created.
    with featsweep_conf():
        yield


def compose_cfg(*overrides: str, hydra: bool = False) -> DictConfig:
    return compose("config", overrides=list(overrides), return_hydra_config=hydra)


def sweep_jobs(*overrides: str) -> list[list[str]]:
    """The jobs Hydra's basic sweeper makes of a preset: its hydra.sweeper.params, expanded."""
    params = compose_cfg(*overrides, hydra=True).hydra.sweeper.params or {}
    parser = OverridesParser.create()
    axes = []
    for key, value in params.items():
        (override,) = parser.parse_overrides([f"{key}={value}"])
        values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [
            override.value()]
        axes.append([f"{key}={v}" for v in values])
    return [list(overrides) + list(combo) for combo in itertools.product(*axes)]


def one_axis_at_a_time(*overrides: str) -> list[list[str]]:
    """Jobs that vary one sweep axis through all its values, the others at their first value:
    sum-of-axes jobs instead of the product, and every swept value is validated."""
    jobs = sweep_jobs(*overrides)
    base = jobs[0]
    out = []
    for axis in range(len(base) - len(overrides)):
        pos = len(overrides) + axis
        for value in dict.fromkeys(job[pos] for job in jobs):
            out.append(base[:pos] + [value] + base[pos + 1:])
    return out


def leaf_keys(cfg: Any, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in cfg.items():
        path = f"{prefix}{key}"
        if isinstance(value, DictConfig):
            keys |= leaf_keys(value, path + ".")
        else:
            keys.add(path)
    return keys


# The notes' twelve runs, written out from docs/notes.md's table (not read from conf/notes/).
# (optimizer, momentum, weight decay, box blur k (1 = none), target.relu)
NOTES = {
    "image001": ("sgd", 0.9, 0.0, 1, "post"),
    "image002": ("sgd", 0.0, 1e-5, 1, "post"),
    "image003": ("sgd", 0.9, 1e-5, 1, "post"),
    "image004": ("sgd", 0.9, 1e-1, 1, "post"),
    "image005": ("sgd", 0.9, 1e-5, 3, "post"),
    "image006": ("sgd", 0.9, 1e-5, 3, "pre"),
    "image007": ("sgd", 0.9, 1e-5, 5, "pre"),
    "image008": ("sgd", 0.9, 1e-5, 7, "pre"),
    "image009": ("sgd", 0.9, 1e-3, 5, "pre"),
    "image010": ("sgd", 0.9, 1e-1, 5, "pre"),
    "image011": ("sgd", 0.9, 1e-1, 3, "pre"),
    "image012": ("adam", None, 1e-2, 3, "pre"),
}

DESIGN_KEYS = {
    "model.name", "model.weights", "target.layer", "target.channel", "target.relu",
    "optimizer.name", "optimizer.lr", "optimizer.momentum", "optimizer.nesterov",
    "optimizer.betas", "optimizer.weight_decay", "regularizer.clamp", "regularizer.clamp_range",
    "regularizer.clamp_space", "blur.kind", "blur.k", "blur.sigma", "blur.every", "image.size",
    "image.space", "steps", "seed", "device", "log_every",
}


@pytest.mark.usefixtures("hydra_conf")
class TestBaseConfig:
    def test_composes_and_validates(self) -> None:
        spec = from_config(compose_cfg())
        assert spec.model.name == "efficientnet_lite0" and spec.model.weights == "pretrained"
        assert spec.target.layer == "_blocks.10"
        assert spec.image.size == 224

    def test_design_keys_present(self) -> None:
        assert DESIGN_KEYS <= leaf_keys(compose_cfg())

    def test_batched_launcher_is_default(self) -> None:
        launcher = compose_cfg(hydra=True).hydra.launcher
        assert "featsweep_batched_launcher" in launcher._target_

    @pytest.mark.parametrize("group, options", [
        ("optimizer", ["sgd", "adam"]),
        ("blur", ["box", "gaussian", "none"]),
        ("model", ["efficientnet_lite0", "inception_v3", "googlenet", "resnet50", "vgg16", "tiny"]),
    ])
    def test_group_options_share_keys(self, group: str, options: list[str]) -> None:
        """So a sweep over the group can also sweep any of its keys without '+'."""
        keys = [leaf_keys(compose_cfg(f"{group}={o}")[group]) for o in options]
        assert all(k == keys[0] for k in keys), dict(zip(options, keys))

    @pytest.mark.parametrize("option", ["efficientnet_lite0", "inception_v3", "googlenet",
                                        "resnet50", "vgg16", "tiny"])
    def test_every_model_validates(self, option: str) -> None:
        spec = from_config(compose_cfg(f"model={option}"))
        assert spec.model.name == option

    def test_readme_sweep_keys_exist_without_plus(self) -> None:
        base = leaf_keys(compose_cfg())
        for key in ("optimizer.name", "blur.k", "image.size", "steps", "device", "model.name",
                    "optimizer.weight_decay", "optimizer.momentum", "target.relu", "seed"):
            assert key in base
        for job in sweep_jobs():  # no sweep params in the base config: one job
            assert job == []
        cfg = compose_cfg("optimizer=adam", "blur.k=5", "model=tiny", "image.size=64",
                          "steps=20", "device=cpu")
        spec = from_config(cfg)
        assert (spec.optimizer.name, spec.blur.k, spec.image.size) == ("adam", 5, 64)


@pytest.mark.usefixtures("hydra_conf")
class TestPresets:
    def test_presets_exist(self) -> None:
        assert {"seed_notes", "smoke"} <= set(PRESETS)

    @pytest.mark.parametrize("preset", PRESETS)
    def test_preset_composes_and_jobs_validate(self, preset: str) -> None:
        """Every value of every sweep axis (others at their first value), plus up to 16 whole
        jobs spread over the sweep (first and last included). Composing all 390 jobs of
        claims_full would take about a minute (80 ms per compose) for little more."""
        jobs = sweep_jobs(f"experiment={preset}")
        assert jobs
        picks = sorted({round(i * (len(jobs) - 1) / 15) for i in range(16)})
        for i in picks:
            assert isinstance(from_config(compose_cfg(*jobs[i])), RunSpec), jobs[i]
        for job in one_axis_at_a_time(f"experiment={preset}"):
            assert isinstance(from_config(compose_cfg(*job)), RunSpec), job

    @pytest.mark.parametrize("preset", PRESETS)
    def test_swept_keys_exist_in_base_config(self, preset: str) -> None:
        base = leaf_keys(compose_cfg())
        params = compose_cfg(f"experiment={preset}", hydra=True).hydra.sweeper.params or {}
        for key in params:
            if key.startswith("+"):  # a config group added on purpose (e.g. +notes)
                assert (CONF / key[1:]).is_dir()
                continue
            group = key.split(".")[0]
            assert key in base or (CONF / group).is_dir() and "." not in key, key

    def test_smoke_is_ci_sized(self) -> None:
        jobs = sweep_jobs("experiment=smoke")
        specs = [from_config(compose_cfg(*job)) for job in jobs]
        assert len(specs) == 8
        assert {s.model.name for s in specs} == {"tiny"}
        assert all(s.steps <= 100 and s.device == "cpu" for s in specs)
        assert len({s.batch_key() for s in specs}) == 1  # one batch


@pytest.mark.usefixtures("hydra_conf")
class TestSeedNotes:
    def test_twelve_jobs(self) -> None:
        jobs = sweep_jobs("experiment=seed_notes")
        assert len(jobs) == 12
        assert [j[-1] for j in jobs] == [f"+notes={n}" for n in NOTES]
        assert compose_cfg("experiment=seed_notes", hydra=True).hydra.mode.name == "MULTIRUN"

    @pytest.mark.parametrize("run", list(NOTES))
    def test_job_matches_the_notes(self, run: str) -> None:
        opt, momentum, wd, k, relu = NOTES[run]
        cfg = compose_cfg("experiment=seed_notes", f"+notes={run}")
        spec = from_config(cfg)
        # common to all twelve runs
        assert spec.model.name == "inception_v3"
        assert spec.image.size == 299
        assert spec.image.space == "normalized"  # the normalized tensor is optimized ...
        assert spec.regularizer.clamp is True  # ... and clamped to [0, 1] after every step
        assert spec.regularizer.clamp_range == (0.0, 1.0)
        assert spec.regularizer.clamp_space == "normalized"
        assert spec.optimizer.lr == 0.01
        assert spec.steps == 10000
        assert spec.target.layer == "Mixed_7c"  # the last block
        assert spec.blur.every == 1
        # per run
        assert spec.optimizer.name == opt
        if momentum is not None:
            assert spec.optimizer.momentum == momentum
            assert spec.optimizer.nesterov is False
        assert spec.optimizer.weight_decay == pytest.approx(wd, rel=0, abs=0)
        assert spec.target.relu == relu
        if k == 1:
            assert spec.blur.kind == "none" or spec.blur.k == 1
        else:
            assert (spec.blur.kind, spec.blur.k) == ("box", k)

    def test_all_jobs_share_one_batch(self) -> None:
        specs = [from_config(compose_cfg(*job)) for job in sweep_jobs("experiment=seed_notes")]
        assert len({s.batch_key() for s in specs}) == 1
        assert len({s.seed for s in specs}) == 1  # the same start for all twelve

    def test_notes_configs_are_distinct(self) -> None:
        specs = [from_config(compose_cfg("experiment=seed_notes", f"+notes={r}")) for r in NOTES]
        rows = {(s.optimizer.name, s.optimizer.momentum, s.optimizer.weight_decay, s.blur.k,
                 s.target.relu) for s in specs}
        assert len(rows) == 12

    def test_dry_run_overrides_compose(self) -> None:
        """The preset's documented dry run: random weights, fewer steps."""
        spec = from_config(compose_cfg("experiment=seed_notes", "+notes=image006",
                                       "model.weights=random", "steps=100"))
        assert (spec.model.weights, spec.steps, spec.target.relu) == ("random", 100, "pre")


@pytest.mark.usefixtures("hydra_conf")
@pytest.mark.parametrize("preset", [None, *PRESETS])
def test_resolved_config_has_no_missing_values(preset: str | None) -> None:
    cfg = compose_cfg(*([f"experiment={preset}"] if preset else []))
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
