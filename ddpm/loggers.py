"""Experiment loggers. Each is built with `run_dir` and the resolved `config` at the call site."""

import logging
from pathlib import Path
from typing import Any

from ddpm.errors import ConfigError

log = logging.getLogger(__name__)
MODES = ("online", "offline", "disabled")


class NullLogger:
    """Logs nothing beyond the console and the run directory's files."""

    def __init__(self, run_dir: str | Path, config: dict[str, Any]):
        self.run_dir = Path(run_dir)

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_image(self, key: str, path: str | Path, step: int, caption: str | None = None) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbLogger(NullLogger):
    """Weights & Biases: config, metrics and images; `mode=offline` needs no account and writes under run_dir."""

    def __init__(
        self,
        run_dir: str | Path,
        config: dict[str, Any],
        project: str = "ddpm",
        entity: str | None = None,
        mode: str = "offline",
        name: str | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
    ):
        super().__init__(run_dir, config)
        if mode not in MODES:
            raise ConfigError(f"logger.mode={mode!r} is not one of {list(MODES)}")
        import wandb  # imported here so that logger=none never pays for it

        self._wandb = wandb
        self.run = wandb.init(
            project=project,
            entity=entity,
            mode=mode,
            name=name,
            group=group,
            tags=list(tags or []),
            dir=str(self.run_dir),
            config=config,
        )
        if mode == "offline":
            log.info("wandb is offline; upload later with: wandb sync %s", self.run.dir.rsplit("/files", 1)[0])

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_image(self, key: str, path: str | Path, step: int, caption: str | None = None) -> None:
        self.run.log({key: self._wandb.Image(str(path), caption=caption)}, step=step)

    def finish(self) -> None:
        self.run.finish()
