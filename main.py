"""The one entry point: `python main.py [task=train|sample|evaluate|benchmark|plot_schedules] [group=option] [key=value ...]`."""

import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

# conf/paths/default.yaml places data and outputs relative to the project, wherever the command runs from.
os.environ.setdefault("DDPM_PROJECT_ROOT", str(Path(__file__).resolve().parent))

from ddpm.errors import ConfigError, UserError  # noqa: E402

log = logging.getLogger("ddpm")


def _expected_error(error: BaseException) -> UserError | None:
    """The UserError behind `error`, also when Hydra's instantiate wrapped it in its own exception."""
    while error is not None:
        if isinstance(error, UserError):
            return error
        error = error.__cause__
    return None


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig):
    task = hydra.utils.get_method(cfg.task._target_)
    try:
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            example = " ".join(f"{key}=..." for key in missing)
            raise ConfigError(f"{', '.join(missing)} must be given a value, e.g. python main.py ... {example}")
        return task(cfg)
    except Exception as error:
        expected = _expected_error(error)
        if expected is None:
            raise
        log.error("%s", expected)
        sys.exit(1)


if __name__ == "__main__":
    main()
