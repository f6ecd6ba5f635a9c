"""Where the modules of the flat layout (ddpm 0.1, every module directly in ddpm/) live now.

A checkpoint stores the resolved config it was trained with, and that config names its components by their
`_target_` paths: `current_targets` rewrites the old paths so that such a checkpoint still builds, resumes,
samples and evaluates. Importing an old module path fails with one line naming the new one.
"""

import importlib.abc
import sys
from typing import Any

# Old module -> new module. Everything a module held moved with it, except the optimizer builder.
MOVED_MODULES = {
    "ddpm.errors": "ddpm.config.errors",
    "ddpm.faults": "ddpm.config.faults",
    "ddpm.checks": "ddpm.config.type_checks",
    "ddpm.validation": "ddpm.config.validation",
    "ddpm.configs": "ddpm.config.differences",
    "ddpm.devices": "ddpm.runtime.devices",
    "ddpm.fast_paths": "ddpm.runtime.fast_paths",
    "ddpm.cpu_share": "ddpm.runtime.cpu_share",
    "ddpm.distributed": "ddpm.runtime.distributed",
    "ddpm.run_directory": "ddpm.runtime.run_directory",
    "ddpm.preflight": "ddpm.runtime.preflight",
    "ddpm.rng": "ddpm.runtime.rng",
    "ddpm.throughput": "ddpm.runtime.throughput",
    "ddpm.checkpoint": "ddpm.io.checkpoint",
    "ddpm.images": "ddpm.io.images",
    "ddpm.loggers": "ddpm.io.loggers",
    "ddpm.plots": "ddpm.io.plots",
    "ddpm.sweep_summary": "ddpm.io.sweep_summary",
    "ddpm.unet": "ddpm.model.unet",
    "ddpm.unet_blocks": "ddpm.model.blocks",
    "ddpm.ema": "ddpm.model.ema",
    "ddpm.schedules": "ddpm.diffusion.schedules",
    "ddpm.diffusion": "ddpm.diffusion.gaussian",
    "ddpm.objectives": "ddpm.diffusion.objectives",
    "ddpm.samplers": "ddpm.diffusion.samplers",
    "ddpm.generation": "ddpm.diffusion.generation",
    "ddpm.build": "ddpm.diffusion.build",
    "ddpm.training": "ddpm.training.loop",
    "ddpm.training_setup": "ddpm.training.setup",
    "ddpm.update": "ddpm.training.update",
    "ddpm.loop_state": "ddpm.training.loop_state",
    "ddpm.nonfinite": "ddpm.training.nonfinite",
    "ddpm.noise_stream": "ddpm.training.noise_stream",
    "ddpm.held_out_loss": "ddpm.training.held_out_loss",
    "ddpm.grids": "ddpm.training.grids",
    "ddpm.train_settings": "ddpm.training.settings",
    "ddpm.checkpointer": "ddpm.training.checkpointer",
    "ddpm.resume": "ddpm.training.resume",
    "ddpm.preemption": "ddpm.training.preemption",
    "ddpm.metrics": "ddpm.evaluation.metrics",
    "ddpm.feature_extractors": "ddpm.evaluation.feature_extractors",
}
# Objects that left their module's new home.
MOVED_OBJECTS = {"ddpm.build.build_optimizer": "ddpm.training.optimizer.build_optimizer"}


def current_target(target: str) -> str:
    """The path of `target` (module.object) in this layout; paths that did not move are returned unchanged."""
    if target in MOVED_OBJECTS:
        return MOVED_OBJECTS[target]
    module, _, name = target.rpartition(".")
    return f"{MOVED_MODULES[module]}.{name}" if module in MOVED_MODULES else target


def current_targets(config: Any) -> Any:
    """`config` (plain dicts and lists, as a checkpoint stores it) with every `_target_` in this layout."""
    if isinstance(config, dict):
        return {
            key: current_target(value) if key == "_target_" and isinstance(value, str) else current_targets(value)
            for key, value in config.items()
        }
    if isinstance(config, list):
        return [current_targets(value) for value in config]
    return config


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """`import ddpm.samplers` (and every other module of the flat layout) fails with the module's new path.
    Asked last, so only about names that no file holds: ddpm.diffusion and ddpm.training are packages now."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        if fullname in MOVED_MODULES:
            raise ModuleNotFoundError(f"{fullname} moved to {MOVED_MODULES[fullname]} (README: Layout)", name=fullname)
        return None


def install_moved_module_finder() -> None:
    """Adds the finder after every other, where Python would otherwise report a plain 'No module named'."""
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
