"""Tests for featsweep.spec: every rule a user can break: a ConfigError naming key and value."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from featsweep.engine import resolve_device
from featsweep.errors import ConfigError, UserError
from featsweep.spec import MODELS, RunSpec, from_config


def base() -> dict[str, Any]:
    """A valid config as plain dicts (what Hydra composes by default, shrunk to the tiny model)."""
    return {
        "model": {"name": "tiny", "weights": "random"},
        "target": {"layer": None, "channel": 7, "relu": "post"},
        "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.0, "nesterov": False,
                      "weight_decay": 0.0, "betas": [0.9, 0.999], "eps": 1e-8},
        "regularizer": {"clamp": True, "clamp_range": [0.0, 1.0], "clamp_space": None},
        "blur": {"kind": "box", "k": 1, "sigma": None, "every": 1},
        "image": {"size": None, "space": "pixel"},
        "steps": 300, "seed": 0, "device": "auto", "log_every": 50, "precision": "fp32",
    }


def with_(**changes: Any) -> dict[str, Any]:
    """base() with dotted keys changed, e.g. with_(**{"optimizer.lr": 0})."""
    cfg = copy.deepcopy(base())
    for key, value in changes.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return cfg


class TestValid:
    def test_smoke(self) -> None:
        spec = from_config(base())
        assert isinstance(spec, RunSpec)
        assert spec.model.name == "tiny"
        assert spec.target.layer == MODELS["tiny"].default_layer  # null -> the model's default
        assert spec.image.size == MODELS["tiny"].default_size
        assert spec.regularizer.clamp_space == "pixel"  # null -> image.space
        assert spec.optimizer.betas == (0.9, 0.999)
        assert spec.blur.sigma is None

    def test_nulls_resolve_per_model(self) -> None:
        spec = from_config(with_(**{"model.name": "inception_v3", "model.weights": "pretrained"}))
        assert (spec.target.layer, spec.image.size) == ("Mixed_7c", 299)

    def test_clamp_space_follows_normalized_image(self) -> None:
        spec = from_config(with_(**{"image.space": "normalized"}))
        assert spec.regularizer.clamp_space == "normalized"

    def test_integral_float_accepted_for_int(self) -> None:
        assert from_config(with_(steps=10.0)).steps == 10

    def test_user_error_is_hydra_compact(self) -> None:
        """ConfigError is what Hydra prints without a traceback."""
        from hydra.errors import CompactHydraException

        assert issubclass(ConfigError, UserError)
        assert issubclass(ConfigError, CompactHydraException)

    def test_as_dict_and_batch_key(self) -> None:
        a = from_config(base())
        b = from_config(with_(**{"optimizer.name": "adam", "blur.k": 3, "target.channel": 1}))
        assert a.batch_key() == b.batch_key()
        assert a.batch_key() != from_config(with_(**{"image.size": 32})).batch_key()
        assert a.as_dict()["optimizer"]["lr"] == 0.01


# (id, changes, fragments the message must contain). Every message names key and value.
BAD: list[tuple[str, dict[str, Any], list[str]]] = [
    ("lr zero", {"optimizer.lr": 0}, ["optimizer.lr=0", "> 0"]),
    ("lr negative", {"optimizer.lr": -0.01}, ["optimizer.lr=-0.01", "> 0"]),
    ("lr nan", {"optimizer.lr": float("nan")}, ["optimizer.lr=nan", "finite"]),
    ("lr string", {"optimizer.lr": "fast"}, ["optimizer.lr='fast'", "a number"]),
    ("steps zero", {"steps": 0}, ["steps=0", ">= 1"]),
    ("steps negative", {"steps": -5}, ["steps=-5", ">= 1"]),
    ("steps word", {"steps": "ten"}, ["steps='ten'", "an integer"]),
    ("steps fraction", {"steps": 10.5}, ["steps=10.5", "an integer"]),
    ("steps bool", {"steps": True}, ["steps=True", "an integer"]),
    ("blur.k even", {"blur.k": 4}, ["blur.k=4", "odd", ">= 1"]),
    ("blur.k zero", {"blur.k": 0}, ["blur.k=0", "odd", ">= 1"]),
    ("blur.k negative", {"blur.k": -3}, ["blur.k=-3", "odd"]),
    ("blur.kind unknown", {"blur.kind": "boxx"}, ["blur.kind='boxx'", "did you mean 'box'"]),
    ("blur.sigma zero", {"blur.kind": "gaussian", "blur.k": 5, "blur.sigma": 0},
     ["blur.sigma=0", "> 0"]),
    ("blur.every zero", {"blur.every": 0}, ["blur.every=0", ">= 1"]),
    ("optimizer unknown", {"optimizer.name": "adma"},
     ["optimizer.name='adma'", "sgd, adam", "did you mean 'adam'"]),
    ("model unknown", {"model.name": "inception_v4"},
     ["model.name='inception_v4'", "did you mean 'inception_v3'"]),
    ("model weights empty", {"model.weights": ""}, ["model.weights=''"]),
    ("tiny pretrained", {"model.weights": "pretrained"},
     ["model.weights='pretrained'", "only has random weights"]),
    ("relu unknown", {"target.relu": "before"}, ["target.relu='before'", "post, pre"]),
    ("relu typo", {"target.relu": "pree"}, ["target.relu='pree'", "did you mean 'pre'"]),
    ("channel negative", {"target.channel": -1}, ["target.channel=-1", ">= 0"]),
    ("channel string", {"target.channel": "seven"}, ["target.channel='seven'", "an integer"]),
    ("layer empty", {"target.layer": ""}, ["target.layer=''", "python -m featsweep.layers"]),
    ("beta1 one", {"optimizer.betas": [1.0, 0.999]}, ["optimizer.betas[0]=1.0", "< 1"]),
    ("beta2 negative", {"optimizer.betas": [0.9, -0.1]}, ["optimizer.betas[1]=-0.1", ">= 0"]),
    ("betas three", {"optimizer.betas": [0.9, 0.99, 0.999]},
     ["optimizer.betas=[0.9, 0.99, 0.999]", "two numbers"]),
    ("betas string", {"optimizer.betas": "0.9,0.99"},
     ["optimizer.betas='0.9,0.99'", "two numbers"]),
    ("momentum one", {"optimizer.momentum": 1.0}, ["optimizer.momentum=1.0", "< 1"]),
    ("momentum negative", {"optimizer.momentum": -0.5}, ["optimizer.momentum=-0.5", ">= 0"]),
    ("nesterov without momentum", {"optimizer.nesterov": True},
     ["optimizer.nesterov=True", "optimizer.momentum > 0"]),
    ("nesterov not bool", {"optimizer.nesterov": "yes"},
     ["optimizer.nesterov='yes'", "true or false"]),
    ("weight decay negative", {"optimizer.weight_decay": -1e-5},
     ["optimizer.weight_decay=-1e-05", ">= 0"]),
    ("eps zero", {"optimizer.eps": 0.0}, ["optimizer.eps=0.0", "> 0"]),
    ("image.size below tiny minimum", {"image.size": 8}, ["image.size=8", "tiny", "at least 16"]),
    ("image.size below inception minimum",
     {"model.name": "inception_v3", "model.weights": "random", "image.size": 64},
     ["image.size=64", "inception_v3", "at least 75"]),
    ("image.size string", {"image.size": "big"}, ["image.size='big'", "an integer"]),
    ("image.space unknown", {"image.space": "pixels"},
     ["image.space='pixels'", "did you mean 'pixel'"]),
    ("clamp not bool", {"regularizer.clamp": "on"}, ["regularizer.clamp='on'", "true or false"]),
    ("clamp range reversed", {"regularizer.clamp_range": [1.0, 0.0]},
     ["regularizer.clamp_range=[1.0, 0.0]", "low must be < high"]),
    ("clamp range empty", {"regularizer.clamp_range": [0.5, 0.5]},
     ["regularizer.clamp_range=[0.5, 0.5]", "low must be < high"]),
    ("clamp space unknown", {"regularizer.clamp_space": "rgb"},
     ["regularizer.clamp_space='rgb'", "pixel, normalized"]),
    ("device unknown", {"device": "gpu"}, ["device='gpu'", "auto, cpu, cuda"]),
    ("device typo", {"device": "cdua"}, ["device='cdua'", "did you mean 'cuda'"]),
    ("seed string", {"seed": "zero"}, ["seed='zero'", "an integer"]),
    ("log_every zero", {"log_every": 0}, ["log_every=0", ">= 1"]),
    ("precision unknown", {"precision": "fp16"}, ["precision='fp16'", "fp32, bf16"]),
    ("blur kernel wider than the image", {"image.size": 16, "blur.k": 33},
     ["blur.k=33", "must fit the image", "image.size (16)"]),
    # --- the toolkit's keys (param, transform, penalties, objectives) ---
    ("param kind unknown", {"param.kind": "fourier"}, ["param.kind='fourier'", "did you mean 'fft'"]),
    ("fft in normalized space", {"param.kind": "fft", "image.space": "normalized"},
     ["image.space='normalized'", "param=fft", "image.space=pixel"]),
    ("sigmoid in normalized space", {"param.squash": "sigmoid", "image.space": "normalized"},
     ["image.space='normalized'", "param.decorrelate/param.squash"]),
    ("squash unknown", {"param.squash": "tanh"}, ["param.squash='tanh'", "none, sigmoid"]),
    ("decay negative", {"param.decay": -1.0}, ["param.decay=-1.0", ">= 0"]),
    ("init_sd zero", {"param.init_sd": 0.0}, ["param.init_sd=0.0", "> 0"]),
    ("decorrelate not bool", {"param.decorrelate": "yes"}, ["param.decorrelate='yes'", "true or false"]),
    ("jitter as large as the image", {"image.size": 32, "transform.jitter": 32},
     ["transform.jitter=32", "smaller than image.size (32)"]),
    ("pad as large as the image", {"image.size": 32, "transform.pad": 40},
     ["transform.pad=40", "smaller than image.size (32)"]),
    ("pad negative", {"transform.pad": -2}, ["transform.pad=-2", ">= 0"]),
    ("pad mode unknown", {"transform.pad_mode": "wrap"},
     ["transform.pad_mode='wrap'", "constant, reflect, replicate"]),
    ("scale list empty", {"transform.scale": []}, ["transform.scale=[]", "at least one value"]),
    ("rotate list empty", {"transform.rotate": []}, ["transform.rotate=[]", "at least one value"]),
    ("scale factor zero", {"transform.scale": [1.0, 0.0]}, ["transform.scale[1]=0.0", "> 0"]),
    ("rotate not a number", {"transform.rotate": ["ten"]}, ["transform.rotate[0]='ten'", "a number"]),
    ("tv weight negative", {"regularizer.tv": -0.05}, ["regularizer.tv=-0.05", ">= 0"]),
    ("l1 weight negative", {"regularizer.l1": -1}, ["regularizer.l1=-1", ">= 0"]),
    ("blur penalty not a number", {"regularizer.blur": "lots"}, ["regularizer.blur='lots'", "a number"]),
    ("blur mode unknown", {"blur.mode": "inside"}, ["blur.mode='inside'", "project, transform"]),
    ("objective unknown", {"target.kind": "neurons"}, ["target.kind='neurons'", "did you mean 'neuron'"]),
    ("neuron x negative", {"target.kind": "neuron", "target.x": -1}, ["target.x=-1", ">= 0"]),
    ("direction missing", {"target.kind": "direction"},
     ["target.direction=None", "a path to a .npy vector", "random"]),
    ("direction file missing", {"target.kind": "direction", "target.direction": "/no/such.npy"},
     ["target.direction='/no/such.npy'", "no such file"]),
    ("diversity without a group", {"target.diversity": 0.5},
     ["target.diversity=0.5", "target.diversity_group"]),
    ("diversity negative", {"target.diversity": -1.0, "target.diversity_group": "a"},
     ["target.diversity=-1.0", ">= 0"]),
    ("relu gradient unknown", {"target.relu_gradient": "redirected"},
     ["target.relu_gradient='redirected'", "did you mean 'redirect'"]),
    ("redirect steps zero", {"target.relu_gradient": "redirect", "target.redirect_steps": 0},
     ["target.redirect_steps=0", ">= 1"]),
]


@pytest.mark.parametrize("changes, fragments", [(c, f) for _, c, f in BAD],
                         ids=[name for name, _, _ in BAD])
def test_bad_input_raises_config_error(changes: dict[str, Any], fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        from_config(with_(**changes))
    message = str(info.value)
    assert message.startswith("featsweep: bad config value ")
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert "\n" not in message  # one paragraph


def test_table_is_big_enough() -> None:
    assert len(BAD) >= 15


def test_missing_group_names_the_key() -> None:
    cfg = base()
    del cfg["optimizer"]
    with pytest.raises(ConfigError, match=r"optimizer\.name=None.*required"):
        from_config(cfg)


class TestResolveDevice:
    def test_cpu(self) -> None:
        assert resolve_device("cpu") == torch.device("cpu")

    def test_auto(self) -> None:
        want = "cuda" if torch.cuda.is_available() else "cpu"
        assert resolve_device("auto").type == want

    def test_cuda_without_gpu_is_config_error(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        with pytest.raises(ConfigError) as info:
            resolve_device("cuda")
        message = str(info.value)
        for fragment in ("device='cuda'", "no CUDA device", "device=cpu or auto"):
            assert fragment in message
        assert resolve_device("auto") == torch.device("cpu")


class TestToolkitKeys:
    def test_blur_kind_none_ignores_k(self) -> None:
        """blur.kind=none means no blur whatever blur.k says (sweeps like blur.kind=none,box)."""
        spec = from_config(with_(**{"blur.kind": "none", "blur.k": 5}))
        assert spec.blur.k == 1 and not spec.blur.active

    def test_defaults_are_the_notes(self) -> None:
        spec = from_config(base())
        assert spec.param.is_plain and not spec.transform.active
        assert spec.target.kind == "channel" and spec.blur.mode == "project"
        assert (spec.regularizer.l1, spec.regularizer.tv) == (0.0, 0.0)

    def test_param_and_transform_do_not_split_batches(self) -> None:
        a = from_config(base())
        b = from_config(with_(**{"param.kind": "fft", "param.squash": "sigmoid",
                                 "transform.pad": 4, "transform.jitter": 3,
                                 "regularizer.tv": 0.1, "target.kind": "deepdream"}))
        assert a.batch_key() == b.batch_key()

    def test_scalar_scale_is_a_list_of_one(self) -> None:
        assert from_config(with_(**{"transform.scale": 1.1})).transform.scale == (1.1,)

    def test_layer_names_become_strings(self) -> None:
        """Hydra turns target.layer=3 into the integer 3; it still names module "3"."""
        cfg = with_(**{"target.layer": "block3"})
        assert from_config(cfg).target.layer == "block3"


class TestUnknownKeys:
    """Issue 15 item 1: a key featsweep does not read is refused, with the closest known key."""

    def test_typo_group_is_refused_with_the_right_key(self) -> None:
        cfg = base()
        cfg["optimzer"] = {"lr": 0.1}
        with pytest.raises(ConfigError, match=r"unknown config key optimzer\.lr=0\.1.*did you mean "
                                              r"optimizer\.lr\?"):
            from_config(cfg)

    def test_typo_leaf_is_refused(self) -> None:
        cfg = with_(**{"optimizer.lr": 0.01})
        cfg["optimizer"]["lrr"] = 0.1
        with pytest.raises(ConfigError, match=r"optimizer\.lrr=0\.1.*did you mean optimizer\.lr\?"):
            from_config(cfg)

    def test_message_is_one_paragraph(self) -> None:
        cfg = base()
        cfg["stepz"] = 10
        with pytest.raises(ConfigError) as info:
            from_config(cfg)
        assert "\n" not in str(info.value) and "did you mean steps?" in str(info.value)

    def test_keys_read_elsewhere_are_known(self) -> None:
        cfg = base()
        cfg["resume"] = False
        from_config(cfg)

    def test_device_gpu_suggests_cuda(self) -> None:
        with pytest.raises(ConfigError, match=r"device='gpu'.*did you mean 'cuda'"):
            from_config(with_(device="gpu"))
