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

# Keys that moved: the feature network of FID is the `fid` group's now, shared by task=evaluate and by FID during
# training (trainer.eval_rate). The old spelling ends in one line that names the new one.
RENAMED = {
    "eval.extractor": "fid.extractor (or fid=tiny for the stand-in network)",
    "eval.inception_weights": "fid.extractor.weights_path",
    "eval.feature_batch_size": "fid.batch_size",
    "eval.reference_dir": "fid.reference_dir",
}


def _renamed_keys(arguments: list[str]) -> list[str]:
    """The messages for command-line overrides that use a key's old name."""
    messages = []
    for argument in arguments:
        key = argument.split("=", 1)[0].lstrip("+~")
        for old, new in RENAMED.items():
            if "=" in argument and (key == old or key.startswith(old + ".")):
                messages.append(f"{key} is now {new}: {argument} -> {argument.replace(old, new.split()[0], 1)}")
    return messages


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
    if renamed := _renamed_keys(sys.argv[1:]):
        print(f"main.py: {'; '.join(renamed)}", file=sys.stderr)
        sys.exit(1)
    main()
