"""How many CPU threads this process may use: the CPUs it is allowed to run on, shared with the processes that
run on the same CPUs at the same time, unless `trainer.num_threads` says otherwise.

torch starts one intra-op thread per core of the machine. Several torch processes on the same cores (the ranks
of torchrun, a SLURM job's tasks, the jobs of a sweep on the local launcher) then run many times slower than
one (threads oversubscribed), and a job that SLURM gave 4 CPUs of a 64-core node starts 64 threads on them.

OMP_NUM_THREADS is not read: torchrun sets it to 1 for every rank, which would leave the allocation idle;
`trainer.num_threads` is the explicit choice.
"""

import dataclasses
import logging
import os
from collections.abc import Mapping

import torch
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from ddpm.config.errors import ConfigError

log = logging.getLogger(__name__)

# Set by ShareCpusAmongLocalJobs in the process that launches a local sweep; every job inherits it.
JOBS_AT_ONCE = "DDPM_LOCAL_JOBS_AT_ONCE"
LOCAL_LAUNCHER = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"


@dataclasses.dataclass(frozen=True)
class CpuShare:
    threads: int  # intra-op threads of this process
    cpus: int  # CPUs this process may run on
    processes: int  # processes that run on those CPUs at the same time, this one included
    source: str  # where the numbers come from, for the log

    def describe(self) -> str:
        return f"{self.threads} CPU thread{'s' * (self.threads != 1)} ({self.source})"


def allowed_cpus(environ: Mapping[str, str]) -> tuple[int, str]:
    """The CPUs this process may use: its affinity mask (what taskset, cgroups' cpusets and SLURM's binding
    set), capped by SLURM_CPUS_PER_TASK inside a SLURM job (a task that SLURM did not bind sees the whole node)."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    per_task = environ.get("SLURM_CPUS_PER_TASK", "")
    if per_task.isdigit() and 0 < int(per_task) < affinity:
        return int(per_task), f"SLURM_CPUS_PER_TASK={per_task}"
    return affinity, f"{affinity} CPUs in the affinity mask"


def processes_on_the_same_cpus(environ: Mapping[str, str]) -> tuple[int, str]:
    """The processes started together on one set of CPUs: the local ranks of torchrun or of submitit's local
    executor (SLURM gives each task its own CPUs), times the jobs of a local sweep that run at once."""

    def count(*names: str) -> int:
        values = [environ[name] for name in names if environ.get(name, "").isdigit()]
        return max(int(values[0]), 1) if values else 1

    ranks, jobs = count("LOCAL_WORLD_SIZE", "SUBMITIT_LOCAL_NTASKS"), count(JOBS_AT_ONCE)
    parts = [f"{ranks} ranks"] * (ranks > 1) + [f"{jobs} sweep jobs at once"] * (jobs > 1)
    return ranks * jobs, " x ".join(parts)


def cpu_share(num_threads: object = None, environ: Mapping[str, str] | None = None) -> CpuShare:
    """trainer.num_threads when given, else this process's equal part of the CPUs it may use (at least 1)."""
    environ = os.environ if environ is None else environ
    if num_threads is not None and (
        isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1
    ):
        raise ConfigError(
            f"trainer.num_threads={num_threads!r} must be a whole number >= 1, or null (the CPUs "
            "this process may use, shared with the processes that run on them)"
        )
    cpus, cpu_source = allowed_cpus(environ)
    processes, sharing = processes_on_the_same_cpus(environ)
    if num_threads is not None and num_threads > cpus:
        # More threads than CPUs only slow a step down (and very many crash OpenMP's start-up).
        raise ConfigError(
            f"trainer.num_threads={num_threads} is more than the {cpus} CPUs this process may use ({cpu_source}): "
            f"at most {cpus}, or null for its share"
        )
    if num_threads is not None:
        return CpuShare(num_threads, cpus, processes, f"trainer.num_threads={num_threads}")
    threads = max(cpus // processes, 1)
    return CpuShare(threads, cpus, processes, f"{cpu_source}, shared by {sharing}" if processes > 1 else cpu_source)


def use_cpu_share(num_threads: object = None) -> CpuShare:
    """Sets torch's intra-op threads to this process's share and logs it (and an oversubscription)."""
    share = cpu_share(num_threads)
    if torch.get_num_threads() != share.threads:
        torch.set_num_threads(share.threads)
    log.info("%s", share.describe())
    if share.threads * share.processes > share.cpus:
        log.warning(
            "%d processes x %d thread(s) run on %d CPUs: each will be slower than alone",
            share.processes,
            share.threads,
            share.cpus,
        )
    return share


def data_workers(num_workers: int | None, device: torch.device, share: CpuShare) -> int:
    """trainer.num_workers, or for null: up to 4 DataLoader workers on a GPU, leaving one CPU of the share to
    the process that feeds the GPU; none on a CPU, where a step takes seconds and loading its batch
    milliseconds, so workers would only take cores from the step's threads."""
    if num_workers is not None:
        return num_workers
    return min(4, share.threads - 1) if device.type == "cuda" else 0


def jobs_launched_at_once(config: DictConfig) -> int:
    """How many jobs of this sweep the launcher starts at the same time: the sweep's size, or the sweeper's
    batch size when it launches in batches (hydra.sweeper.max_batch_size, or n_jobs for Optuna)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    batch = OmegaConf.select(config, "hydra.sweeper.max_batch_size") or OmegaConf.select(config, "hydra.sweeper.n_jobs")
    try:
        batches = BasicSweeper.split_arguments(overrides, batch)
    except Exception:  # a sweep the basic sweeper cannot expand (ranges, intervals): the batch size bounds it
        return batch or 1
    return max(len(jobs) for jobs in batches)


class ShareCpusAmongLocalJobs(Callback):
    """Before a sweep on the local launcher (`hydra/launcher=local`) starts its jobs, which all run at once on
    this machine, tells them how many they are (JOBS_AT_ONCE): each then takes its share of the CPUs."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        if OmegaConf.select(config, "hydra.launcher._target_") == LOCAL_LAUNCHER:
            os.environ[JOBS_AT_ONCE] = str(jobs_launched_at_once(config))
