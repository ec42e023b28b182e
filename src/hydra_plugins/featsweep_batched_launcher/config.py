"""Config of ``hydra/launcher=batched``, registered in Hydra's ConfigStore."""

# No `from __future__ import annotations` here: Hydra's plugin scan executes this module without
# registering it in sys.modules, and dataclasses then cannot resolve string annotations.
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class BatchedLauncherConf:
    _target_: str = "hydra_plugins.featsweep_batched_launcher.batched_launcher.BatchedLauncher"
    # Images per engine batch. Jobs sharing model, weights, image size and space, device and
    # precision are packed into batches of at most this many; a batch the memory check says
    # cannot fit is split up front, and on out-of-memory a batch is split in halves and retried,
    # so no job is lost. max_batch=1 reproduces a job exactly from its config alone (a batch's
    # size and mates change the rounding; see README, Reproducibility), at the cost of batching.
    max_batch: int = 64
    # Where each batch runs: "local" (in this process, one batch after another),
    # "submitit_local" (each batch as one submitit task on this machine; for tests) or
    # "submitit_slurm" (each batch as one SLURM task, all of them as one job array).
    backend: str = "local"
    # List the jobs and their batches (resume decisions included) and stop: nothing is loaded,
    # run or written. `python -m featsweep --dry-run ...` sets it.
    dry_run: bool = False
    # How each job's Hydra run is done: "featsweep" (the job directory, .hydra/ files, log file
    # and JobReturn Hydra's run_job gives, without its per-job deep copies of the config) or
    # "hydra" (Hydra's own run_job for every job, as the basic launcher does; slower). Jobs whose
    # config calls a resolver that reads Hydra's config singleton (${hydra:...}), and sweeps with
    # a callback that acts per job (on_job_start/on_job_end), use Hydra's run_job either way.
    run_job: str = "featsweep"

    # ---- submitit settings: used only when backend is submitit_*. Same names and meanings as
    # Hydra's submitit launcher (hydra/launcher=submitit_slurm); one batch = one task = one
    # process, so there is no nodes / tasks_per_node.
    # Folder for submitit's pickles and each task's stdout/stderr (%j = the job id).
    submitit_folder: str = "${hydra.sweep.dir}/.submitit/%j"
    # Wall-clock limit of one task (one whole batch), minutes.
    timeout_min: int = 60
    # CPU cores per task; None = the cluster's default.
    cpus_per_task: Optional[int] = None
    # GPUs per task (the node's GPUs this batch may use); None = none requested.
    gpus_per_node: Optional[int] = None
    # Memory per task, GB; None = the cluster's default.
    mem_gb: Optional[int] = None
    # Job name shown by the scheduler.
    name: str = "${hydra.job.name}"
    # Write the task's stderr into its stdout file.
    stderr_to_stdout: bool = False
    # SLURM only (backend=submitit_slurm); see `man sbatch`.
    # Partition (queue) to submit to; None = the cluster's default.
    partition: Optional[str] = None
    # Quality of service.
    qos: Optional[str] = None
    # Free-text job comment.
    comment: Optional[str] = None
    # Node features required, e.g. "a100".
    constraint: Optional[str] = None
    # Nodes not to use, e.g. "node[01-03]".
    exclude: Optional[str] = None
    # Generic resources, e.g. "gpu:1" (alternative to gpus_per_node / gpus_per_task).
    gres: Optional[str] = None
    # CPU cores per GPU.
    cpus_per_gpu: Optional[int] = None
    # GPUs per task.
    gpus_per_task: Optional[int] = None
    # Memory per GPU, with units, e.g. "32G".
    mem_per_gpu: Optional[str] = None
    # Memory per CPU core, with units, e.g. "4G".
    mem_per_cpu: Optional[str] = None
    # Account to charge.
    account: Optional[str] = None
    # Seconds before the time limit at which submitit sends its timeout signal (USR2).
    signal_delay_s: int = 120
    # Times a task that hit its time limit is requeued (0 = never). At the USR2 signal the batch
    # writes its finished jobs and its running ones as interrupted with their state, and the
    # requeued task continues them from there.
    max_num_timeout: int = 3
    # Extra sbatch options, e.g. {"mail-user": "me@lab.org", "mail-type": "END"}.
    additional_parameters: Dict[str, Any] = field(default_factory=dict)
    # Most batches (array tasks) running at the same time.
    array_parallelism: int = 256
    # Shell lines run before the task starts, e.g. ["module load cuda/12.4"].
    setup: Optional[List[str]] = None


ConfigStore.instance().store(group="hydra/launcher", name="batched", node=BatchedLauncherConf,
                             provider="featsweep")
