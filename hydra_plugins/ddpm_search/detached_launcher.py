"""The detached SLURM launcher (hydra/launcher=slurm_detached), where Hydra looks for plugins. The work is in
ddpm.runtime.detached_launch."""

from ddpm.runtime.detached_launch import DetachedSlurm


class DetachedSlurmLauncher(DetachedSlurm):
    """hydra-submitit-launcher's SLURM launcher that returns once the jobs are submitted."""
