"""The one entry point: `python main.py [task=train|sample|evaluate|benchmark|plot_schedules|import] [group=option] [key=value ...]`."""

import logging
import math
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

# conf/paths/default.yaml places data and outputs relative to the project, wherever the command runs from.
os.environ.setdefault("DDPM_PROJECT_ROOT", str(Path(__file__).resolve().parent))

from ddpm.config.faults import explain, one_line, print_error
from ddpm.config.validation import check_config
from ddpm.io.sweep_summary import after_sweep_job, clear_job_error, record_job_error
from ddpm.runtime.cpu_share import use_cpu_share
from ddpm.runtime.run_directory import claim, launch_rank, release_all, restore_hydra_records
from ddpm.runtime.sweep_directory import searching

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


def _unreadable_overrides(arguments: list[str]) -> list[str]:
    """Messages for overrides with characters outside ASCII that Hydra's grammar cannot read unquoted (a path
    with an umlaut, say): Hydra's own error is a lexer's, with no hint to quote the value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser, messages = OverridesParser.create(), []
    for argument in arguments:
        if argument.isascii() or "=" not in argument:
            continue
        try:
            parser.parse_override(argument)
        except Exception:  # the grammar's error: what to do about it is said here
            key, value = argument.split("=", 1)
            messages.append(
                f"{argument} cannot be read: a value with characters outside ASCII must be quoted, "
                f"as in {key}='\"{value}\"' on the shell's command line"
            )
    return messages


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig):
    """Runs the task; every fault ddpm.config.faults recognizes ends in one line and exit status 1. Rank 0 holds the
    run directory (ddpm.runtime.run_directory) until the task ends."""
    task = hydra.utils.get_method(cfg.task._target_)
    hydra_config = HydraConfig.get()
    job_dir = hydra_config.runtime.output_dir
    holds_directory = False  # only the process that holds a sweep job's directory writes its error line there
    try:
        if launch_rank() == 0:  # a no-op for a single run, whose directory was claimed before Hydra wrote there
            claim(job_dir)
            holds_directory = True
            clear_job_error(job_dir)
        check_config(cfg)
        use_cpu_share(OmegaConf.select(cfg, "trainer.num_threads"))  # every task: threads sized to the allocation
        return task(cfg)
    except Exception as error:
        expected = explain(error, num_workers=OmegaConf.select(cfg, "trainer.num_workers"))
        if holds_directory and hydra_config.mode == RunMode.MULTIRUN:  # the sweep summary's error column
            record_job_error(job_dir, one_line(expected) if expected else one_line(f"{type(error).__name__}: {error}"))
        if expected is None:
            raise
        log.error("%s", one_line(expected))
        if holds_directory and hydra_config.mode != RunMode.MULTIRUN:
            restore_hydra_records(job_dir)  # a refused command leaves the run's records as they were
        if searching():
            return math.nan  # a failed trial, which the summary lists with this line: the search goes on
        sys.exit(1)
    finally:
        release_all()
        if holds_directory and hydra_config.mode == RunMode.MULTIRUN:
            after_sweep_job(cfg, job_dir, hydra_config.sweep.dir)


if __name__ == "__main__":
    if faults := _renamed_keys(sys.argv[1:]) + _unreadable_overrides(sys.argv[1:]):
        print(f"main.py: {'; '.join(faults)}", file=sys.stderr)
        sys.exit(1)
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C outside the training steps (which stop at a step boundary instead)
        print_error(
            "interrupted by SIGINT: checkpoints and npz files written so far are intact (every write is "
            "atomic); run the same command to start again"
        )
        sys.exit(130)
