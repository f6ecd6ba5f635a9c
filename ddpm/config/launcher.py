"""The SLURM launcher's settings (hydra.launcher, from conf/hydra/launcher/slurm.yaml), checked before a sweep
submits anything: submitit passes them to sbatch as they are, and a job that SLURM refuses or kills at once
says why only in its log on the cluster."""

from typing import Any

from ddpm.config.errors import ConfigError

# hydra/launcher=slurm_detached (ddpm.runtime.detached_launch): returns once the jobs are submitted.
DETACHED_LAUNCHER = "hydra_plugins.ddpm_search.detached_launcher.DetachedSlurmLauncher"
# SLURM may send the time-limit signal up to this much earlier than asked (its timer resolution).
SLURM_SIGNAL_SLACK_S = 60


def check_launcher(launcher: Any) -> None:
    """hydra.launcher of a submitit launcher: positive counts, and a time limit that leaves the job time to run
    before its USR2 warning."""
    target = str(launcher.get("_target_", "")) if launcher is not None else ""
    if "submitit" not in target and target != DETACHED_LAUNCHER:
        return
    for key in ("timeout_min", "nodes", "tasks_per_node"):
        value = launcher.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"hydra.launcher.{key}={value!r} must be a whole number >= 1")
    timeout_min, delay = launcher.get("timeout_min"), launcher.get("signal_delay_s")
    if delay is not None and (isinstance(delay, bool) or not isinstance(delay, int) or delay < 0):
        raise ConfigError(f"hydra.launcher.signal_delay_s={delay!r} must be a whole number of seconds >= 0")
    if timeout_min is not None and delay is not None and timeout_min * 60 <= delay + SLURM_SIGNAL_SLACK_S:
        raise ConfigError(
            f"hydra.launcher.timeout_min={timeout_min} leaves no time before the USR2 warning that "
            f"hydra.launcher.signal_delay_s={delay} asks for (SLURM may send it {SLURM_SIGNAL_SLACK_S} s earlier "
            f"still): a time limit above {(delay + SLURM_SIGNAL_SLACK_S) // 60 + 1} minutes, or a shorter delay"
        )
