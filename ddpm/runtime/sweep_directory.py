"""A sweep directory belongs to one sweep: the one whose overrides are recorded in `<sweep dir>/sweep.json`.

Launching the same sweep again (after a failed or killed job, or to train longer) continues it: each job with a
result leaves it as it is and each job without one runs. Another sweep in the same directory would continue the
first sweep's runs as if they were its own, so it is refused before any job starts.
"""

import json
from pathlib import Path

from ddpm.config.errors import ConfigError

SWEEP_FILE = "sweep.json"
# The sweeper of the search presets (ddpm.runtime.optuna_search): a failed trial is a result there, not the end.
SEARCH_SWEEPER = "hydra_plugins.ddpm_search.search_sweeper.ResumableOptunaSweeper"
# Overrides that a relaunch of the same sweep may change: where and how it runs and logs, and how long it trains
# (a longer run continues the same one). The sweeper's search space is part of the sweep.
MAY_CHANGE = ("hydra.", "hydra/", "logger", "trainer.iterations", "trainer.resume")
PART_OF_THE_SWEEP = ("hydra.sweeper.params.",)


def defining_overrides(overrides: list[str]) -> list[str]:
    """The overrides that say which jobs a sweep has, sorted."""

    def key(override: str) -> str:
        return override.split("=", 1)[0].lstrip("+~")

    return sorted(
        {
            override
            for override in overrides
            if key(override).startswith(PART_OF_THE_SWEEP) or not key(override).startswith(MAY_CHANGE)
        }
    )


def claim_sweep(directory: Path, overrides: list[str]) -> None:
    """Records this sweep as the directory's, or checks that the directory's recorded sweep is this one. A
    recorded sweep without a job directory (refused before its first job, say) does not own the directory."""
    wanted = defining_overrides(overrides)
    record = directory / SWEEP_FILE
    if record.is_file():
        try:
            recorded = json.loads(record.read_text())["overrides"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ConfigError(
                f"hydra.sweep.dir={directory} holds an unreadable {SWEEP_FILE} ({error}): give this sweep its own "
                "hydra.sweep.dir"
            ) from None
        if recorded != wanted and any(path.name.isdigit() for path in directory.iterdir() if path.is_dir()):
            only_here = [o for o in wanted if o not in recorded] or ["nothing"]
            only_there = [o for o in recorded if o not in wanted] or ["nothing"]
            raise ConfigError(
                f"hydra.sweep.dir={directory} holds another sweep (this one has {' '.join(only_here)}; that one "
                f"had {' '.join(only_there)}): give this sweep its own hydra.sweep.dir; launching that sweep again "
                "(trainer.iterations may be raised) continues it"
            )
        if recorded == wanted:
            return
    directory.mkdir(parents=True, exist_ok=True)  # a new sweep, or one refused before its first job: recorded
    temporary = record.with_suffix(".tmp")
    temporary.write_text(json.dumps({"overrides": wanted}, indent=2) + "\n")
    temporary.replace(record)


def searching() -> bool:
    """Whether this process runs a job of a search (the search presets' sweeper), where a job's objective is
    what the sweeper reads: a job that cannot produce one is refused, and a failed job is a failed trial."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.initialized() and HydraConfig.get().sweeper.get("_target_") == SEARCH_SWEEPER
