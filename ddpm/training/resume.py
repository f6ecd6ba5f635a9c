"""Which checkpoint a training run continues from (`trainer.resume`), and whether it may continue from it."""

import inspect
import json
import logging
from pathlib import Path
from typing import Any

from hydra.utils import get_object

from ddpm.config.differences import describe, differences
from ddpm.config.errors import CheckpointError, ConfigError
from ddpm.io.checkpoint import load_checkpoint, periodic_checkpoints
from ddpm.io.loggers import sweep_job

log = logging.getLogger(__name__)

# A checkpoint only continues a run of the same network, process and data. What the run computes besides may
# change (iterations, rates, learning rate, the grids' sampler, the FID network), with a warning that the result
# is no longer the uninterrupted run's. Where files go (paths) and where metrics are shown (logger) may change
# freely: they are in neither list.
MUST_MATCH = ("model", "schedule", "diffusion", "dataset")
MUST_MATCH_TRAINER = ("use_labels", "loss_type", "use_ema")
MAY_MOVE = ("dataset.root", "dataset.path", "dataset.download")  # the same data, somewhere else
CHANGE_THE_RESULT = ("optimizer", "trainer", "sampler", "fid")
TRAINING_STATE = ("optimizer", "loop", "data", "rng")


def find_resume_checkpoint(
    setting: str, checkpoint_dir: Path, *, run: str | None = None, trust: bool = False
) -> tuple[Path, dict[str, Any]] | None:
    """`trainer.resume`: never -> None; auto -> the newest intact checkpoint of run `run` (the id the run
    directory records; None accepts any) in checkpoint_dir: last.pt, then the periodic ones, newest first; or
    None when there is none. Anything else is the path of one. `trust` loads checkpoints without a digest."""
    if setting == "never":
        return None
    if setting != "auto":
        path = Path(setting)
        return path, load_checkpoint(path, key="trainer.resume", trust=trust)
    last = checkpoint_dir / "last.pt"
    if last.exists() and not last.is_file():
        raise CheckpointError(
            f"{last} is a directory, not a checkpoint: trainer.resume=auto cannot continue from it "
            "nor write a new one there; move it away"
        )
    candidates = [p for p in [last, *periodic_checkpoints(checkpoint_dir)] if p.is_file()]
    failures, foreign = [], []
    for path in candidates:
        try:
            state = load_checkpoint(path, key="trainer.resume=auto found:", trust=trust)
        except CheckpointError as error:
            log.warning("%s; trying an older checkpoint", error)
            failures.append(path.name)
            continue
        if run is not None and state.get("run_id") not in (run, None):
            log.warning(
                "trainer.resume=auto found %s, which belongs to another run (%s, not %s, the run this "
                "directory holds): not continuing it",
                path,
                state.get("run_id"),
                run,
            )
            foreign.append(path.name)
            continue
        if failures:
            log.warning(
                "resuming from %s (step %d) instead of the damaged %s", path, state["step"], ", ".join(failures)
            )
        return path, state
    if failures or foreign:
        raise CheckpointError(
            f"trainer.resume=auto: no checkpoint in {checkpoint_dir} is an intact one of this run ({', '.join(failures) or 'none'} "
            f"damaged; {', '.join(foreign) or 'none'} of another run). "
            "Start over with trainer.resume=never (the files are moved aside) or pass trainer.resume=PATH."
        )
    return None


def with_later_options(saved: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's config with the options that `config` sets and its components gained since the checkpoint
    was written filled in with the components' defaults, which are the behaviour the checkpoint was trained with:
    an older run stays resumable."""
    filled = dict(saved)
    for section in MUST_MATCH:
        settings = saved.get(section)
        if not isinstance(settings, dict) or "_target_" not in settings:
            continue
        try:
            parameters = inspect.signature(get_object(settings["_target_"])).parameters.values()
        except (ImportError, AttributeError, ValueError, TypeError):
            continue  # a component that no longer exists: the comparison names the difference
        defaults = {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}
        wanted = config.get(section) if isinstance(config.get(section), dict) else {}
        later = {
            name: list(value) if isinstance(value, tuple) else value
            for name, value in defaults.items()
            if name in wanted and name not in settings
        }
        filled[section] = {**settings, **later}
    return filled


def finished_run(run_dir: Path, state: dict[str, Any], iterations: int) -> dict[str, Any] | None:
    """The summary of the run in run_dir when `state` (its newest checkpoint) is where that run finished and
    trainer.iterations asks for no more steps: starting the same command again then has nothing to do. A run
    whose iterations were raised continues (and writes a new summary at its new end)."""
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # unreadable: the run continues and writes it anew
    if not isinstance(summary, dict) or summary.get("steps") != state.get("step"):
        return None  # written before a later resume went on
    return summary if summary.get("stopped_early") or state["step"] >= iterations else None


def check_resumable(
    path: Path, state: dict[str, Any], config: dict[str, Any], *, refuse_changes: tuple[str, str] | None = None
) -> None:
    """Refuses a checkpoint without training state or of another model/data; warns about other changes, or, with
    `refuse_changes` = (what holds the checkpoint, what to do instead), refuses those too, trainer.iterations
    aside (a finished run, or a job of another sweep, is not continued with other settings)."""
    missing = [key for key in TRAINING_STATE if key not in state]
    if missing:
        raise CheckpointError(
            f"trainer.resume={path} holds weights but no training state ({', '.join(missing)} missing), so the run "
            "cannot continue from it; it can still be sampled from (task=sample checkpoint=...)."
        )
    saved = with_later_options(state["config"], config)
    fixed = [c for c in differences(saved, config, MUST_MATCH) if c[0] not in MAY_MOVE]
    fixed += [c for c in differences(saved, config, ("trainer",)) if c[0].split(".")[1] in MUST_MATCH_TRAINER]
    if fixed:
        key, old, new = fixed[0]
        raise ConfigError(
            f"{key}={new!r}, but trainer.resume={path} was trained with {key}={old!r} "
            f"({describe(fixed)}). Continue with the checkpoint's settings, or start a new run "
            "(trainer.resume=never, or another hydra.run.dir)."
        )
    changed = [c for c in differences(saved, config, CHANGE_THE_RESULT) if c[0] != "trainer.resume"]
    refused = [c for c in changed if c[0] != "trainer.iterations"] if refuse_changes else []
    if refused:
        key, old, new = refused[0]
        holder, instead = refuse_changes
        raise ConfigError(f"{key}={new!r}, but {holder} with {key}={old!r} ({describe(refused)}): {instead}")
    if changed:
        log.warning(
            "continuing %s with changed settings (%s): the result will differ from the uninterrupted run",
            path,
            describe(changed),
        )


def what_may_not_change(run_dir: Path, finished: dict | None) -> tuple[str, str] | None:
    """Where a resumed run's settings may not change (see check_resumable): a finished run, and the run of a
    sweep's job, which is this sweep's only when its settings are the same (another sweep in the same
    hydra.sweep.dir, or a constant hydra.sweep.subdir, would otherwise continue other jobs' runs)."""
    if sweep_job() is not None:
        return (
            f"{run_dir} holds the run of another job (of another sweep, or of this one)",
            "give this sweep its own hydra.sweep.dir (launching the same sweep again continues its jobs) and a "
            "hydra.sweep.subdir that differs per job",
        )
    if finished:
        return (
            f"the run in {run_dir} finished at step {finished['steps']}",
            "start a new run for these settings (trainer.resume=never, or another hydra.run.dir), or raise "
            "trainer.iterations to continue this one with them",
        )
    return None
