"""``python -m featsweep.layers [MODEL OVERRIDES] [image.size=N] [--all] [--archs]``: list a
network's targetable layers.

The arguments are featsweep's own config overrides, composed by Hydra exactly as for a run, so
every way of naming a network works::

    python -m featsweep.layers model=inception_v3
    python -m featsweep.layers model=torchvision model.arch=resnet18
    python -m featsweep.layers model=timm model.arch=vit_tiny_patch16_224 +model.img_size=64
    python -m featsweep.layers model=custom model._target_=mypkg.nets.make_net model.mean=[0.5] \\
        model.std=[0.25] model.in_channels=1
    python -m featsweep.layers model=torchvision --archs      # the architectures model.arch takes

Prints every module whose output is a (channels, height, width) map or a (tokens, channels)
sequence, in forward order, with its channel count, output size, and whether ``target.relu=pre``
applies (its output is made of ReLU/ReLU6 outputs, module or functional). Layer shapes do not
depend on weights, so the network is built with random weights (``model.weights`` is ignored):
this works before any checkpoint is installed.
"""

from __future__ import annotations

import sys
from typing import Sequence

from featsweep.errors import UserError, config_error

USAGE = ("usage: python -m featsweep.layers [model=NAME | model=torchvision model.arch=NAME | "
         "model=timm model.arch=NAME | model=custom model._target_=pkg.module.factory ...] "
         "[image.size=N] [--all] [--archs]\n"
         "  --all also lists modules whose output is not a feature map; --archs lists the "
         "architectures of model=torchvision or model=timm")


def _compose(overrides: Sequence[str]):  # -> DictConfig
    """featsweep's config with `overrides`, composed as ``python -m featsweep`` would."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from featsweep.__main__ import CONFIG_DIR

    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as exc:
        import difflib
        from pathlib import Path

        from hydra.errors import MissingConfigException

        chosen = [o.split("=", 1)[1] for o in overrides if o.startswith("model=")]
        if isinstance(exc, MissingConfigException) and chosen:
            names = sorted(p.stem for p in (Path(CONFIG_DIR) / "model").glob("*.yaml"))
            close = difflib.get_close_matches(chosen[-1], names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise config_error("model", chosen[-1], f"allowed values are {', '.join(names)}"
                               f"{hint}; any torchvision classifier is model=torchvision "
                               f"model.arch=NAME") from None
        raise UserError(f"featsweep.layers: {exc}\n{USAGE}") from None


def _parse(argv: Sequence[str]) -> tuple[list[str], bool, bool]:
    overrides, show_all, archs = [], False, False
    for arg in argv:
        if arg in ("-h", "--help"):
            print(USAGE)
            raise SystemExit(0)
        if arg == "--all":
            show_all = True
        elif arg == "--archs":
            archs = True
        elif arg.startswith("-") or "=" not in arg:
            raise UserError(f"featsweep.layers: unknown argument {arg!r}\n{USAGE}")
        else:
            key, _, value = arg.partition("=")
            overrides.append(f"model={value}" if key == "model.name" else arg)
    return overrides, show_all, archs


def _resolve(overrides: Sequence[str]):  # -> (ModelSpec, ModelInfo, size)
    from featsweep.spec import _get, _number, model_from_config, model_info

    cfg = _compose(overrides)
    spec = model_from_config(cfg)
    info = model_info(spec)
    size = _get(cfg, "image.size", None)
    size = info.default_size if size is None else _number("image.size", size, kind=int)
    if size < info.min_size or (info.max_size is not None and size > info.max_size):
        allowed = (f"exactly {info.min_size}" if info.max_size == info.min_size
                   else f"at least {info.min_size}")
        raise config_error("image.size", size, f"{spec.label} needs images of {allowed} px")
    return spec, info, size


def main(argv: Sequence[str] | None = None) -> int:
    try:
        overrides, show_all, list_archs = _parse(sys.argv[1:] if argv is None else argv)
        if list_archs:
            return _print_archs(overrides)
        spec, info, size = _resolve(overrides)
        import dataclasses

        from featsweep.models import build_model, check_input

        # Shapes do not depend on weights: random weights, so no checkpoint is needed.
        model = build_model(dataclasses.replace(spec, weights="random"))
        check_input(model, spec, size)  # a clear message if it does not run at this size
        _print_layers(model, spec, info, size, show_all)
    except UserError as exc:
        print(exc, file=sys.stderr)
        return 2
    return 0


def _print_archs(overrides: Sequence[str]) -> int:
    from featsweep.models import architectures

    form = next((o.partition("=")[2] for o in overrides if o.startswith("model=")), None)
    if form not in ("torchvision", "timm"):
        raise UserError(f"featsweep.layers: --archs lists the architectures of model=torchvision "
                        f"or model=timm, got model={form}\n{USAGE}")
    for name in architectures(form):
        print(name)
    return 0


def _print_layers(model, spec, info, size: int, show_all: bool) -> None:  # noqa: ANN001
    from featsweep.targets import has_pre_relu, probe_layers

    channels_in = info.in_channels
    layers = probe_layers(model, size, in_channels=channels_in)
    order = [i.name for i in layers]
    default = f"default layer {info.default_layer}" if info.default_layer else "no default layer"
    print(f"{spec.label} at {size}x{size} px, {channels_in} input channel(s) ({default}); "
          "relu: 'pre' = target.relu=pre is available; tokens: target.token=0..N-1 picks one")
    print(f"{'layer':<40} {'kind':<24} {'channels':>8} {'output':>11}  relu")
    for layer in layers:
        mappable = layer.output in ("tensor", "tokens") and len(layer.shape) == 3
        if not ((mappable and layer.calls == 1) or show_all):
            continue
        if mappable:
            channels = layer.shape[0]
            hw = (f"{layer.shape[2]} tokens" if layer.output == "tokens"
                  else f"{layer.shape[1]}x{layer.shape[2]}")
        else:
            channels = "-"
            hw = str(layer.shape) if layer.output in ("tensor", "tokens") else layer.output
        relu = ("pre" if mappable and layer.calls == 1
                and has_pre_relu(model, order, layer.name, size, in_channels=channels_in) else "")
        shared = f" (runs {layer.calls}x: not targetable)" if layer.calls > 1 else ""
        print(f"{layer.name:<40} {layer.kind:<24} {channels:>8} {hw:>11}  {relu}{shared}")


if __name__ == "__main__":
    sys.exit(main())
