"""Config of ``hydra/launcher=batched``, registered in Hydra's ConfigStore."""

# No `from __future__ import annotations` here: Hydra's plugin scan executes this module without
# registering it in sys.modules, and dataclasses then cannot resolve string annotations.
from dataclasses import dataclass

from hydra.core.config_store import ConfigStore


@dataclass
class BatchedLauncherConf:
    _target_: str = "hydra_plugins.featsweep_batched_launcher.batched_launcher.BatchedLauncher"
    # Images per engine batch. Jobs sharing model, weights, image size and space, device and
    # precision are packed into batches of at most this many; on CUDA out-of-memory a batch is
    # split in halves and retried, so no job is lost.
    max_batch: int = 64


ConfigStore.instance().store(group="hydra/launcher", name="batched", node=BatchedLauncherConf,
                             provider="featsweep")
