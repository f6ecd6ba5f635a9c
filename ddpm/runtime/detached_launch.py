"""A SLURM sweep that returns once its jobs are submitted (`hydra/launcher=slurm_detached`).

hydra-submitit-launcher waits for every job of the sweep to end, so the command (and the login-node shell or
tmux pane it runs in) has to live as long as the longest job. The jobs need none of it: each writes its own
results and updates the sweep summary as it ends (ddpm.io.sweep_summary.after_sweep_job), and a requeued job
continues from its checkpoint. This launcher submits the job array as the SLURM launcher does and returns at
once; Hydra's sweeper then sees each job as launched with no result yet.
"""

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

log = logging.getLogger(__name__)


class Submitted:
    """Stands in for a submitit job whose result the sweep does not wait for."""

    def __init__(self, job: Any, overrides: Sequence[str]):
        self.job, self.overrides = job, list(overrides)

    def results(self) -> list[JobReturn]:
        return [JobReturn(overrides=self.overrides, status=JobStatus.COMPLETED, _return_value=None)]


class DetachedSlurm(SlurmLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        with submit_only() as submitted:
            returns = super().launch(job_overrides, initial_job_idx)
        ids = ", ".join(str(job.job_id) for job in submitted)
        log.info(
            "submitted %d jobs (SLURM job ids %s) and returning: each job updates the sweep summary in %s as it "
            "ends; watch them with squeue --me, and launch the same command again to run the jobs that end "
            "without a result",
            len(submitted),
            ids,
            self.config.hydra.sweep.dir,
        )
        return returns


@contextlib.contextmanager
def submit_only() -> Iterator[list[Any]]:
    """While open, submitit's map_array submits the jobs and hands back stand-ins that do not wait for them."""
    import submitit

    submitted: list[Any] = []
    map_array = submitit.AutoExecutor.map_array

    def submit(executor: Any, function: Any, *iterables: Any) -> list[Submitted]:
        jobs = map_array(executor, function, *iterables)
        submitted.extend(jobs)
        return [Submitted(job, overrides) for job, overrides in zip(jobs, iterables[0], strict=True)]

    submitit.AutoExecutor.map_array = submit
    try:
        yield submitted
    finally:
        submitit.AutoExecutor.map_array = map_array
