"""``python -m featsweep.layers model=NAME [image.size=N] [--all]``: list a model's targetable layers.

Prints every module whose output is a (channels, height, width) map, in forward order, with its
channel count, output size, and whether it ends in a ReLU (so ``target.relu=pre`` applies).
Layer shapes do not depend on weights, so the architecture is built with random weights: this
works before any checkpoint is installed.
"""

from __future__ import annotations

import sys
from typing import Sequence

from featsweep.errors import UserError, config_error
from featsweep.models import build_model
from featsweep.spec import MODELS, ModelSpec
from featsweep.targets import has_pre_relu, probe_layers

USAGE = ("usage: python -m featsweep.layers model=NAME [image.size=N] [--all]\n"
         f"  NAME: {', '.join(MODELS)}; --all also lists non-convolutional modules")


def _parse(argv: Sequence[str]) -> tuple[str, int | None, bool]:
    model, size, show_all = "efficientnet_lite0", None, False
    for arg in argv:
        key, _, value = arg.partition("=")
        if arg == "--all":
            show_all = True
        elif key in ("model", "model.name") and value:
            model = value
        elif key == "image.size" and value.isdigit():
            size = int(value)
        else:
            raise UserError(f"featsweep.layers: unknown argument {arg!r}\n{USAGE}")
    if model not in MODELS:
        raise config_error("model", model, f"allowed values are {', '.join(MODELS)}")
    return model, size, show_all


def main(argv: Sequence[str] | None = None) -> int:
    try:
        name, size, show_all = _parse(sys.argv[1:] if argv is None else argv)
    except UserError as exc:
        print(exc, file=sys.stderr)
        return 2
    info = MODELS[name]
    size = size or info.default_size
    if size < info.min_size:
        print(config_error("image.size", size, f"{name} needs images of at least {info.min_size} px"),
              file=sys.stderr)
        return 2
    model = build_model(ModelSpec(name, "random"))
    layers = probe_layers(model, size)
    order = [i.name for i in layers]
    print(f"{name} at {size}x{size} px (default layer {info.default_layer}); "
          "relu: 'pre' = target.relu=pre is available")
    print(f"{'layer':<40} {'kind':<24} {'channels':>8} {'output':>9}  relu")
    for layer in layers:
        conv_map = len(layer.shape) == 3 and layer.calls == 1
        if not (conv_map or show_all):
            continue
        channels = layer.shape[0] if len(layer.shape) == 3 else "-"
        hw = f"{layer.shape[1]}x{layer.shape[2]}" if len(layer.shape) == 3 else str(layer.shape)
        relu = "pre" if conv_map and has_pre_relu(model, order, layer.name, size) else ""
        shared = f" (runs {layer.calls}x: not targetable)" if layer.calls > 1 else ""
        print(f"{layer.name:<40} {layer.kind:<24} {channels:>8} {hw:>9}  {relu}{shared}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
