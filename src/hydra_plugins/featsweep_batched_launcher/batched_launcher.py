"""The Launcher class: Hydra's contract (setup / launch); the sweep's logic is in ``_sweep``."""

from __future__ import annotations

from typing import Any, Sequence

from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf


class BatchedLauncher(Launcher):
    """Runs featsweep jobs that can share a network as one batch, then each job's normal Hydra
    run writes its precomputed results. Other task functions run one job at a time.

    `backend` says where the batches run: in this process (``local``) or as one submitit task per
    batch (``submitit_local``, ``submitit_slurm``; the other keyword arguments are the submitit
    settings of :class:`~hydra_plugins.featsweep_batched_launcher.config.BatchedLauncherConf`).
    """

    def __init__(self, max_batch: int = 64, backend: str = "local", dry_run: bool = False,
                 run_job: str = "featsweep", **submitit: Any) -> None:
        from hydra_plugins.featsweep_batched_launcher._job_run import JobLogging, YamlTemplates

        self.max_batch = max_batch
        self.backend = backend
        self.dry_run = dry_run
        self.run_job = run_job
        self.yaml_files = YamlTemplates()  # the jobs' .hydra/*.yaml, written from templates
        self.job_logging = JobLogging()  # the jobs' logging, reopened at each job's log file
        self.submitit: dict[str, Any] = {
            k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
            for k, v in submitit.items()}
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        from hydra_plugins.featsweep_batched_launcher import _plan as plan, sweep_loader

        plan.check_settings(self)
        # Compose each job from its config-group choices once (the sweeper shares this context,
        # so its check of every job is fast too); job configs stay what Hydra composes.
        sweep_loader.install(hydra_context)
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def launch(self, job_overrides: Sequence[Sequence[str]],
               initial_job_idx: int) -> Sequence[JobReturn]:
        from hydra_plugins.featsweep_batched_launcher import _sweep as sweep

        return sweep.launch(self, job_overrides, initial_job_idx)
