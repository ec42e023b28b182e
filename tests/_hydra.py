"""featsweep's own config, composed in-process by the tests, and the test networks' overrides."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from hydra import initialize_config_dir
from hydra.core.singleton import Singleton

import featsweep

CONF = Path(featsweep.__file__).resolve().parent / "conf"

# model=custom overrides of the networks the tests build (tests/featsweep_testnets, torchvision).
SMALL_NET = ["model=custom", "model._target_=featsweep_testnets.make_small_net",
             "model.mean=[0.5,0.5,0.5]", "model.std=[0.25,0.25,0.25]", "model.size=32"]
TINY_VIT = ["model=custom", "model._target_=torchvision.models.VisionTransformer",
            "+model.image_size=32", "+model.patch_size=8", "+model.num_layers=2",
            "+model.num_heads=2", "+model.hidden_dim=16", "+model.mlp_dim=32",
            "+model.num_classes=10", "model.mean=[0.5,0.5,0.5]", "model.std=[0.5,0.5,0.5]",
            "model.size=32", "model.min_size=32"]


@contextmanager
def featsweep_conf() -> Iterator[None]:
    """conf/ as Hydra's config dir (``compose`` works inside); Hydra's singletons (version base
    included) are restored afterwards, so Hydra's own launcher suites never see this state."""
    state = Singleton.get_state()
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            yield
    finally:
        Singleton.set_state(state)
