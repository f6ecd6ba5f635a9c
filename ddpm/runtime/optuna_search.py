"""Hyperparameter search with Optuna that a relaunch continues: the search presets' sweeper (Hydra finds it as
hydra_plugins.ddpm_search.search_sweeper.ResumableOptunaSweeper, a subclass of this module's ResumableSearch).

Hydra's Optuna sweeper asks Optuna for trials and launches one job per trial. This subclass keeps what it does
(the search space of `hydra.sweeper.params`, the sampler, `n_jobs` trials at a time) and changes three things:

- `n_trials` is the size of the study, not of one launch, and launching the same search again runs only the
  trials still missing. The study is kept in the sweep directory (`trials.json`: each trial's parameters, state
  and value, replayed into Optuna on a relaunch; or in `hydra.sweeper.storage` where one is given). Trials that
  a stopped launch left running count as failed, and new trials take job directories after every earlier one,
  so no trial lands in another trial's directory.
- A trial without an objective (its job failed with a fault, which it records in the sweep summary, or it
  returned none) is a failed trial: the search goes on. Optuna 2 refused a NaN value with a traceback.
- Its settings (n_trials, n_jobs, direction, the search space and its keys) are checked before any trial, each
  fault in one line naming the key; a search space key that the config does not have gets the closest one.
"""

import json
import logging
import math
import sys
import warnings
from pathlib import Path
from typing import Any

import optuna
from hydra.utils import instantiate
from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
from omegaconf import DictConfig, OmegaConf

from ddpm.config.errors import ConfigError
from ddpm.config.faults import print_error
from ddpm.config.launcher import DETACHED_LAUNCHER
from ddpm.config.validation import unknown_key

log = logging.getLogger(__name__)

DIRECTIONS = ("minimize", "maximize")
TRIALS_FILE = "trials.json"


class ResumableSearch(OptunaSweeper):
    def sweep(self, arguments: list[str]) -> None:
        impl = self.sweeper
        try:
            distributions, fixed = search_space(impl, impl.config, list(arguments))
        except ConfigError as error:
            print_error(error)  # Hydra has not set up logging for the sweep yet
            sys.exit(1)
        sweep_dir = Path(str(impl.config.hydra.sweep.dir))
        study = optuna.create_study(
            study_name=impl.study_name,
            storage=impl.storage,
            sampler=impl.sampler,
            direction=impl._get_directions()[0],
            load_if_exists=True,
        )
        records = read_records(sweep_dir) if impl.storage is None else []
        replay(study, records, distributions)
        study.sampler = continued_sampler(impl, len(study.trials))
        fail_interrupted_trials(study, records)
        finished = sum(trial.state.is_finished() for trial in study.trials)
        job_index = len(study.trials)  # the next trial's job directory: after every earlier trial's
        to_go = impl.n_trials - finished
        log.info("study %s: %d of %d trials finished, %d to go", study.study_name, finished, impl.n_trials, to_go)
        while to_go > 0:
            trials = [study.ask() for _ in range(min(to_go, impl.n_jobs))]
            overrides = impl._configure_trials(trials, distributions, fixed)
            records += [{"number": trial.number, "params": trial.params, "state": "RUNNING"} for trial in trials]
            write_records(sweep_dir, records, impl.storage)
            returns = impl.launcher.launch(overrides, initial_job_idx=job_index)
            job_index += len(returns)
            for trial, job in zip(trials, returns, strict=True):
                value = objective_of(job)
                if value is None:
                    log.warning("trial %d has no objective: it counts as failed (see the sweep summary)", trial.number)
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                else:
                    study.tell(trial, value)
                records[trial.number].update(state="COMPLETE" if value is not None else "FAIL", value=value)
            write_records(sweep_dir, records, impl.storage)
            to_go -= len(trials)
        write_results(study, sweep_dir)


def search_space(impl: Any, config: DictConfig, arguments: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The sweeper's settings checked, and its search space (hydra.sweeper.params, then the command line's
    sweep arguments) as (Optuna distributions, fixed values)."""
    if OmegaConf.select(config, "hydra.launcher._target_") == DETACHED_LAUNCHER:
        raise ConfigError(
            "hydra/launcher=slurm_detached returns before the trials' objectives exist, which a search proposes "
            "its next trials from: use hydra/launcher=slurm"
        )
    for key in ("n_trials", "n_jobs"):
        value = getattr(impl, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"hydra.sweeper.{key}={value!r} must be an integer >= 1")
    directions = impl._get_directions()
    if len(directions) != 1 or directions[0] not in DIRECTIONS:
        raise ConfigError(
            f"hydra.sweeper.direction={impl.direction!r} must be one of {list(DIRECTIONS)} (a single objective)"
        )
    if impl.search_space is not None or impl.custom_search_space_extender is not None:
        raise ConfigError("hydra.sweeper.search_space and custom_search_space: give the space as hydra.sweeper.params")
    if isinstance(impl.sampler, type) or getattr(impl.sampler, "func", None) is optuna.samplers.GridSampler:
        raise ConfigError("hydra.sweeper.sampler=grid: sweep a grid with the basic sweeper (python main.py -m a=1,2)")
    given = [(f"hydra.sweeper.params.{key}", f"{key}={value}") for key, value in (impl.params or {}).items()]
    given += [("", argument) for argument in arguments]
    distributions, fixed = {}, {}
    for where, override in given:
        key = override.split("=", 1)[0].lstrip("+~")
        if OmegaConf.select(config, key, default=_MISSING) is _MISSING and not _is_group(config, key):
            section, _, name = key.rpartition(".")
            known = list(OmegaConf.select(config, section) or {}) if section else list(config)
            prefix = where.removesuffix("." + key) if where else ""
            raise unknown_key(name, ".".join(part for part in (prefix, section) if part), known)
        try:
            found, constant = create_params_from_overrides([override])
        except Exception as error:  # Hydra's override parser or Optuna's distribution: the value is bad
            shown = f"hydra.sweeper.params.{override}" if where else override
            raise ConfigError(f"{shown}: {error}".replace("\n", " ")) from None
        distributions.update(found)
        fixed.update(constant)
    for name in fixed:
        distributions.pop(name, None)
    return distributions, fixed


_MISSING = object()


def _is_group(config: DictConfig, key: str) -> bool:
    """A config group chosen by name (schedule=cosine): the choice Hydra records under hydra.runtime.choices."""
    return key in (OmegaConf.select(config, "hydra.runtime.choices") or {})


def read_records(sweep_dir: Path) -> list[dict[str, Any]]:
    path = sweep_dir / TRIALS_FILE
    if not path.is_file():
        return []
    try:
        records = json.loads(path.read_text())
        assert isinstance(records, list) and all({"params", "state"} <= set(record) for record in records)
    except (OSError, ValueError, AssertionError):
        raise ConfigError(
            f"hydra.sweep.dir={sweep_dir} holds an unreadable {TRIALS_FILE}: give the search its own"
        ) from None
    return records


def write_records(sweep_dir: Path, records: list[dict[str, Any]], storage: Any) -> None:
    if storage is None:
        temporary = sweep_dir / f"{TRIALS_FILE}.tmp"
        temporary.write_text(json.dumps(records, indent=1) + "\n")
        temporary.replace(sweep_dir / TRIALS_FILE)


def replay(study: optuna.Study, records: list[dict[str, Any]], distributions: dict[str, Any]) -> None:
    """The trials of earlier launches, back into a study kept in memory: finished ones as they ended, those a
    stopped launch left running as failed (their runs stay in their job directories)."""
    for record in records:
        complete = record["state"] == "COMPLETE"
        with warnings.catch_warnings():  # add_trial and create_trial are "experimental" in Optuna 2
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.add_trial(
                optuna.trial.create_trial(
                    params=record["params"],
                    distributions={name: distributions[name] for name in record["params"] if name in distributions},
                    value=record.get("value") if complete else None,
                    state=optuna.trial.TrialState.COMPLETE if complete else optuna.trial.TrialState.FAIL,
                )
            )
        if record["state"] == "RUNNING":
            log.warning("trial %d was left running by a stopped launch: it counts as failed", len(study.trials) - 1)
            record["state"] = "FAIL"


def continued_sampler(impl: Any, earlier_trials: int) -> Any:
    """The sampler, its seed (when it has one) moved on by the trials of earlier launches: seeded as in the
    first launch, it would propose the first launch's trials again."""
    node = impl.config.hydra.sweeper.sampler
    seed = node.get("seed")
    if earlier_trials == 0 or seed is None:
        return impl.sampler
    return instantiate(node, seed=seed + earlier_trials)


def fail_interrupted_trials(study: optuna.Study, records: list[dict[str, Any]]) -> None:
    """Trials still running in a stored study were left by a launch that was stopped: failed."""
    for trial in study.trials:
        if trial.state == optuna.trial.TrialState.RUNNING:
            log.warning("trial %d was left running by a stopped launch: it counts as failed", trial.number)
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)


def objective_of(job: Any) -> float | None:
    """The trial's value: the job's finite return value, else None (a job that failed or returned none)."""
    try:
        value = float(job.return_value)
    except Exception:  # the job raised (its exception is re-raised here), or returned no number
        return None
    return value if math.isfinite(value) else None


def write_results(study: optuna.Study, sweep_dir: Path) -> None:
    """optimization_results.yaml with the best trial (as Hydra's Optuna sweeper writes it), or one line when
    no trial has an objective."""
    completed = [trial for trial in study.trials if trial.state == optuna.trial.TrialState.COMPLETE]
    if not completed:
        print_error(
            f"none of the {len(study.trials)} trials of the search has an objective: see the errors in "
            f"{sweep_dir}/summary.md"
        )
        sys.exit(1)
    best = study.best_trial
    log.info("best trial %d: value %s, parameters %s", best.number, best.value, best.params)
    results = {"name": "optuna", "best_params": best.params, "best_value": best.value}
    OmegaConf.save(OmegaConf.create(results), sweep_dir / "optimization_results.yaml")
