"""The batched launcher's own job run (``_job_run``) against Hydra's: the same files."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from hydra_plugins.featsweep_batched_launcher._job_run import YamlTemplates, reads_singleton

from test_launcher import check_ok, featsweep


def _values(rng: random.Random) -> list:
    return [0, 7, -3, 10**12, 0.5, -0.0, 0.0, 1e-30, float("inf"), True, False, None, "", "a",
            "yes", "null", "1.5", "has space", "x" * 120, "long " * 30, "two\nlines", "a: b",
            "#hash", "'quoted'", '"dq"', "tab\t", "ünï", "${now:%H}", "-", "~",
            rng.random(), rng.randint(-10**6, 10**6), f"path/{rng.randint(0, 99)}/x"]


def test_templates_write_what_omegaconf_writes() -> None:
    """Many configs of one shape (a mapping, a nested list, Hydra-like overrides) with scalars
    drawn from values that YAML quotes, folds or writes plain: every text equals to_yaml's."""
    rng = random.Random(0)
    files = YamlTemplates()
    for _ in range(400):
        vals = _values(rng)
        pick = lambda: rng.choice(vals)  # noqa: E731
        container = {"seed": pick(), "opt": {"lr": pick(), "name": pick(), "betas": [pick(), 2]},
                     "hydra": {"job": {"num": pick(), "override_dirname": pick()},
                               "task": [f"seed={pick()}", pick()]},
                     "help": "a long help text " * 8 + "\nwith lines", "empty": {}, "none": []}
        assert files.dump("config.yaml", container) == OmegaConf.to_yaml(container)
    assert files.stats["template"] > 100  # the templates were really used


def test_a_changed_shape_is_dumped_in_full() -> None:
    files = YamlTemplates()
    for container in ({"a": 1, "b": [1, 2]}, {"a": 2, "b": [1, 2, 3]}, {"a": 3, "c": [1]},
                      {"a": {"x": 1}, "b": [1, 2]}):
        assert files.dump("f", container) == OmegaConf.to_yaml(container)
    assert files.stats == {"template": 0, "full": 4}


def test_resolvers_that_read_hydras_singleton_are_found() -> None:
    assert not reads_singleton({"a": "${now:%Y}", "b": ["${oc.env:HOME}", "${a}"]})
    assert reads_singleton({"a": {"b": ["x", "${hydra:job.num}"]}})
    assert reads_singleton({"a": "pre ${my_resolver:1} post"})


@pytest.mark.slow
def test_job_directories_equal_hydras_run_job(tmp_path: Path) -> None:
    """The same 6-job sweep with Hydra's run_job for every job and with featsweep's: every
    job's .hydra/*.yaml are identical but for the sweep directory and the run_job override,
    its log lines and files are the same."""
    args = ["optimizer=sgd,adam", "seed=0,1,2", "model=tiny", "device=cpu", "image.size=32",
            "steps=1"]
    for name, extra in (("hh", ["hydra.launcher.run_job=hydra"]), ("ff", [])):
        (tmp_path / name).mkdir()
        check_ok(featsweep(tmp_path / name, *args, *extra))
    hydra_dir, ours = tmp_path / "hh" / "sweep", tmp_path / "ff" / "sweep"
    jobs = sorted(d.name for d in hydra_dir.iterdir() if d.is_dir())
    assert jobs == [str(i) for i in range(6)]
    for job in jobs:
        a, b = hydra_dir / job, ours / job
        assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
        for name in ("config.yaml", "overrides.yaml"):
            assert (a / ".hydra" / name).read_text() == (b / ".hydra" / name).read_text()
        text = (a / ".hydra" / "hydra.yaml").read_text()
        text = text.replace("    - hydra.launcher.run_job=hydra\n", "")
        text = text.replace("run_job: hydra", "run_job: featsweep").replace(str(tmp_path / "hh"),
                                                                           str(tmp_path / "ff"))
        assert text == (b / ".hydra" / "hydra.yaml").read_text()
        strip = lambda p: [line.split("] - ", 1)[-1].replace(str(tmp_path / "hh"), "X")  # noqa: E731
                           .replace(str(tmp_path / "ff"), "X") for line in p.read_text().splitlines()]
        assert strip(a / "featsweep.log") == strip(b / "featsweep.log")
        assert (a / "image.npy").read_bytes() == (b / "image.npy").read_bytes()


def _job_logging_config(tmp_path: Path, **changes: object) -> object:
    from hydra import compose
    from omegaconf import open_dict, read_write

    from _hydra import featsweep_conf

    with featsweep_conf():
        cfg = compose("config", return_hydra_config=True)
    with read_write(cfg), open_dict(cfg):
        cfg.hydra.job.name = "featsweep"
        for key, value in changes.items():
            OmegaConf.update(cfg, key, value)
    return cfg


def test_job_logging_reopens_the_file_and_rebuilds_on_any_other_change(tmp_path: Path) -> None:
    """JobLogging: consecutive jobs that differ only in their log file's path keep the same
    handlers, each line lands in its own job's file; another format, disable_existing_loggers
    or logging reconfigured in between gives a fresh configuration (Hydra's configure_log)."""
    import logging

    from hydra_plugins.featsweep_batched_launcher._job_run import JobLogging

    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    cfg = _job_logging_config(tmp_path)
    logging_ = JobLogging()
    try:
        seen = []
        for name, fmt, dis in [("a", None, False), ("b", None, False), ("c", "%(message)s!", False),
                               ("d", None, True), ("e", None, True)]:
            (tmp_path / name).mkdir()
            changes = {"hydra.runtime.output_dir": str(tmp_path / name),
                       "hydra.job_logging.disable_existing_loggers": dis}
            if fmt:
                changes["hydra.job_logging.formatters.simple.format"] = fmt
            for key, value in changes.items():
                OmegaConf.update(cfg, key, value, force_add=True)
            logging_.configure(cfg)
            seen.append(list(root.handlers))
            root.info(f"line of job {name}")  # the root: disable_existing_loggers leaves it on
            if fmt:
                OmegaConf.update(cfg, "hydra.job_logging.formatters.simple.format",
                                 "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
        for h in root.handlers:
            h.flush()
        for name in "abcde":
            text = (tmp_path / name / "featsweep.log").read_text()
            assert text.count("line of job") == 1 and f"line of job {name}" in text, name
        assert (tmp_path / "c" / "featsweep.log").read_text() == "line of job c!\n"
        same = [seen[i][0] is seen[i - 1][0] for i in range(1, 5)]
        assert same == [True, False, False, False]  # a -> b reused; c (format), d, e (disable) new
        # logging reconfigured by someone else: a new configuration, not a stale handler
        OmegaConf.update(cfg, "hydra.runtime.output_dir", str(tmp_path / "a"))
        OmegaConf.update(cfg, "hydra.job_logging.disable_existing_loggers", False)
        logging_.configure(cfg)
        kept = list(root.handlers)
        logging.basicConfig(force=True)
        logging_.configure(cfg)
        assert root.handlers[0] is not kept[0]
    finally:
        for h in root.handlers:
            h.close()
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
