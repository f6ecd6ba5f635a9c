"""The optimizer of a training run, built from the `optimizer` node with its hyperparameters checked."""

import math
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ddpm.config.errors import ConfigError


def build_optimizer(cfg: DictConfig, params) -> torch.optim.Optimizer:
    """The `optimizer` node applied to `params`; bad hyperparameters are reported under their config keys.

    `fused: null` means fused where the optimizer has a fused kernel (Adam, AdamW and SGD do, on CPU and CUDA):
    one kernel per step, and a non-finite step can be skipped without a host sync.
    """
    node = cfg.optimizer
    fused = node.get("fused")
    if fused is not None and not isinstance(fused, bool):
        raise ConfigError(f"optimizer.fused={fused!r} must be true, false or null (fused where available)")
    for key, positive in (("lr", True), ("eps", False), ("weight_decay", False)):
        value = node.get(key)
        number = not isinstance(value, bool) and isinstance(value, (int, float))
        if value is not None and not (number and math.isfinite(value) and (value > 0 if positive else value >= 0)):
            raise ConfigError(f"optimizer.{key}={value!r} must be a finite number {'> 0' if positive else '>= 0'}")
    betas = node.get("betas")
    if betas is not None and (
        not OmegaConf.is_list(betas)
        or len(betas) != 2
        or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas)
    ):
        raise ConfigError(f"optimizer.betas={betas!r} must be two numbers in [0, 1), e.g. [0.9, 0.999]")
    if "fused" in node and fused is None:
        node = OmegaConf.merge(node, {"fused": True})
    try:
        return instantiate(node)(params=params)
    except (TypeError, ValueError) as error:  # whatever else the optimizer's own checks refuse
        settings = ", ".join(f"optimizer.{k}={v!r}" for k, v in node.items() if not k.startswith("_"))
        raise ConfigError(f"the optimizer {node._target_} refused its settings ({settings}): {error}") from error


def match_parameter_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Every state tensor of a parameter's shape (Adam's moments) in that parameter's memory layout.

    `Optimizer.load_state_dict` moves state to the parameter's device and dtype but keeps the layout it was
    saved in, so a run resumed with another `trainer.channels_last` (or on CUDA, where channels_last is the
    default, from a CPU checkpoint) holds NCHW moments for channels_last weights. The fused kernels assume
    equal strides: on the CPU they then compute a wrong update without a word, on CUDA they refuse.
    """
    for parameter, state in optimizer.state.items():
        for name, value in state.items():
            if torch.is_tensor(value) and value.shape == parameter.shape and value.stride() != parameter.stride():
                state[name] = torch.empty_like(parameter, dtype=value.dtype).copy_(value)


def with_configured_settings(saved: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A checkpoint's optimizer state with this run's settings in its parameter groups, which
    `Optimizer.load_state_dict` would otherwise take from the checkpoint: the configured learning rate (the
    checkpoint's is that of its last step, warmed up or decayed part-way; the loop schedules from the configured
    one), the configured hyperparameters (a change was warned about) and the configured kernel, fused or not,
    which decides where Adam keeps its step count and whether a non-finite step can be skipped on the device (a
    for-loop checkpoint resumed with a fused optimizer failed at its first step; the reverse kept the
    checkpoint's kernel)."""
    if len(saved.get("param_groups", ())) != len(optimizer.param_groups):
        return saved  # load_state_dict names the mismatch
    groups = [
        {**saved_group, **{key: value for key, value in group.items() if key != "params"}}
        for saved_group, group in zip(saved["param_groups"], optimizer.param_groups, strict=True)
    ]
    return {**saved, "param_groups": groups}
