"""Experiment loggers. Each is built with `run_dir` and the resolved `config` at the call site, with
`resume_step` and `resume_state` (from the checkpoint) when the run continues an earlier one, and with `sweep`
(`sweep_job()`) when it is a job of a multirun."""

import json
import logging
import math
import netrc
import os
import socket
import urllib.parse
from pathlib import Path
from typing import Any

from ddpm.config.errors import ConfigError

log = logging.getLogger(__name__)
MODES = ("online", "offline", "disabled")
METRICS_FILE = "metrics.jsonl"


def check_logger(node: Any) -> None:
    """The logger's settings, before the run loads anything: wandb itself refuses a bad mode only when the run
    starts, and online without credentials or network fails there after a minute and a half of retries."""
    if node is None or node.get("_target_") != f"{__name__}.WandbLogger":
        return
    mode = node.get("mode", "offline")
    check_mode(mode)
    if mode != "online":
        return
    url = urllib.parse.urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    instead = "or use logger.mode=offline (no account, no network) and upload later with `wandb sync`"
    if not os.environ.get("WANDB_API_KEY") and not _netrc_login(host):
        raise ConfigError(
            f"logger.mode=online needs a W&B API key for {host}, and none is set (WANDB_API_KEY, or `wandb "
            f"login`): log in, {instead}"
        )
    try:
        socket.create_connection((host, port), timeout=10).close()
    except OSError as error:
        raise ConfigError(
            f"logger.mode=online cannot reach {url.geturl()} ({error.strerror or error}): {instead}"
        ) from None


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ConfigError(f"logger.mode={mode!r} is not one of {list(MODES)}")


def _netrc_login(host: str) -> bool:
    """Whether ~/.netrc (where `wandb login` keeps the key) has an entry for `host`."""
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class NullLogger:
    """Logs nothing: the logger of data-parallel ranks above 0 (rank 0 alone logs), and the base of the others."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_image(self, key: str, path: str | Path, step: int, caption: str | None = None) -> None:
        pass

    def plot(self) -> None:
        """Redraws the run's picture of its metrics (at every checkpoint)."""

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue this log (saved in every checkpoint)."""
        return {}

    def finish(self) -> None:
        """Ends the log; safe to call more than once."""


def sweep_job() -> dict[str, Any] | None:
    """This job's place in a Hydra multirun, for grouping its runs: the sweep directory's name (the group),
    the job's name in it and its command-line overrides; None outside a multirun (a single run, the Python API)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    hydra_config = HydraConfig.get()
    sweep = Path(str(hydra_config.sweep.dir)).resolve()
    group = "-".join(sweep.parts[-2:])  # e.g. 2026-12-03-14-03-12 for outputs/multiruns/2026-12-03/14-03-12
    return {"group": group, "name": f"{group}/{hydra_config.job.num}", "overrides": list(hydra_config.overrides.task)}


class LocalLogger(NullLogger):
    """Writes every logged metric to `<run dir>/metrics.jsonl`, one JSON object per log step.

    On resume, the lines after the checkpoint's step (logged by the process that died) are dropped, so the
    file reads as one uninterrupted run.
    """

    def __init__(
        self,
        run_dir: str | Path,
        config: dict[str, Any],
        resume_step: int | None = None,
        resume_state: dict[str, Any] | None = None,
        sweep: dict[str, Any] | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        kept = []
        if resume_step is not None and self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= resume_step:
                        kept.append(line + "\n")
                except (ValueError, KeyError, TypeError):  # a line cut short by the kill
                    continue
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(kept))

    def log(self, metrics: dict[str, float], step: int) -> None:
        row = {"step": step, **{k: (v if math.isfinite(v) else str(v)) for k, v in metrics.items()}}
        with open(self.path, "a") as file:
            file.write(json.dumps(row) + "\n")

    def plot(self) -> None:
        """metrics.png beside metrics.jsonl. A picture is not worth stopping a run for: a failure is a warning."""
        from ddpm.io.plots import plot_training_metrics

        try:
            plot_training_metrics(self.path)
        except Exception as error:
            log.warning("could not draw %s: %s: %s", self.path.with_name("metrics.png"), type(error).__name__, error)


class WandbLogger(LocalLogger):
    """Weights & Biases (and metrics.jsonl): config, metrics and images. `mode=offline` needs no account and
    writes under run_dir. A resumed run (a requeued job too) continues the same wandb run id. A job of a sweep
    (`sweep`, from `sweep_job`) is grouped by its sweep unless `group` is set, named `<group>/<job number>`
    unless `name` is, and its overrides are in its config as `overrides`."""

    def __init__(
        self,
        run_dir: str | Path,
        config: dict[str, Any],
        resume_step: int | None = None,
        resume_state: dict[str, Any] | None = None,
        sweep: dict[str, Any] | None = None,
        project: str = "ddpm",
        entity: str | None = None,
        mode: str = "offline",
        name: str | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
    ):
        check_mode(mode)  # the rest of check_logger (key, network) ran before the run loaded anything
        super().__init__(run_dir, config, resume_step, resume_state)
        import wandb  # imported here so that logger=none never pays for it

        self._wandb = wandb
        run_id = (resume_state or {}).get("wandb_run_id")
        if sweep is not None:  # one wandb run per job, grouped by sweep, its overrides in its config
            group, name = group or sweep["group"], name or sweep["name"]
            config = {**config, "overrides": sweep["overrides"]}
        self.run = wandb.init(
            project=project,
            entity=entity,
            mode=mode,
            name=name,
            group=group,
            tags=list(tags or []),
            dir=str(self.run_dir),
            config=config,
            id=run_id,
            resume="allow" if run_id else None,
        )
        self.run_id = self.run.id
        if run_id:
            log.info("wandb: continuing run %s from step %d", run_id, resume_step)
        if mode == "offline":
            log.info("wandb is offline; upload later with: wandb sync %s", self.run.dir.rsplit("/files", 1)[0])

    def log(self, metrics: dict[str, float], step: int) -> None:
        super().log(metrics, step)
        self.run.log(metrics, step=step)

    def log_image(self, key: str, path: str | Path, step: int, caption: str | None = None) -> None:
        self.run.log({key: self._wandb.Image(str(path), caption=caption)}, step=step)

    def state_dict(self) -> dict[str, Any]:
        return {"wandb_run_id": self.run_id}

    def finish(self) -> None:
        """Closes the run (once: a stopped run closes it before its requeue, and again on the way out)."""
        if self.run is not None:
            self.run.finish()
            self.run = None
