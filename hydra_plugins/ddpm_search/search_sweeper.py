"""The search presets' sweeper, where Hydra looks for plugins (it instantiates sweepers only from the
`hydra_plugins` namespace). The work is in ddpm.runtime.optuna_search."""

from ddpm.runtime.optuna_search import ResumableSearch


class ResumableOptunaSweeper(ResumableSearch):
    """Hydra's Optuna sweeper that a relaunch continues (see ddpm.runtime.optuna_search)."""
