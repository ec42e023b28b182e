"""RunSpecs for the engine tests: a base config (plain dicts, as Hydra composes them) with
dotted-key changes, e.g. ``make_spec(BASE, **{"param.kind": "fft", "steps": 3})``."""

from __future__ import annotations

import copy
from typing import Any, Mapping

from featsweep.spec import RunSpec, from_config


def changed(base: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of `base` with each dotted key set (missing nodes are created)."""
    cfg = copy.deepcopy(dict(base))
    for key, value in changes.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return cfg


def make_spec(base: Mapping[str, Any], **changes: Any) -> RunSpec:
    return from_config(changed(base, changes))


def tiny_config(**top: Any) -> dict[str, Any]:
    """The tiny random CNN at 32 px on the CPU, SGD, clamp on, no blur; `top` overrides."""
    cfg: dict[str, Any] = {
        "model": {"name": "tiny", "weights": "random"},
        "target": {"layer": "block3", "channel": 12, "relu": "post"},
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.0, "nesterov": False,
                      "weight_decay": 0.0, "betas": [0.9, 0.999], "eps": 1e-8},
        "regularizer": {"clamp": True, "clamp_range": [0.0, 1.0], "clamp_space": None},
        "blur": {"kind": "none", "k": 1, "sigma": None, "every": 1},
        "image": {"size": 32, "space": "pixel"},
        "steps": 5, "seed": 0, "device": "cpu", "log_every": 100,
    }
    cfg.update(top)
    return cfg
