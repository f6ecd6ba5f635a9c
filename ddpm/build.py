"""Builds a diffusion model from a composed config, or from a checkpoint (whose config travels inside it)."""

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ddpm.checkpoint import load_checkpoint
from ddpm.diffusion import GaussianDiffusion
from ddpm.ema import EMA
from ddpm.errors import CheckpointError, ConfigError


def build_diffusion(cfg: DictConfig) -> GaussianDiffusion:
    """Network -> noise schedule -> EMA copy -> diffusion, from the model, schedule, trainer and diffusion nodes."""
    # A null label for classifier-free guidance exists when training drops labels.
    model = instantiate(cfg.model, null_class=cfg.trainer.get("label_dropout", 0.0) > 0)
    betas = instantiate(cfg.schedule)
    trainer = cfg.trainer
    ema = (
        EMA(model, decay=trainer.ema_decay, start=trainer.ema_start, update_rate=trainer.ema_update_rate)
        if trainer.use_ema
        else None
    )
    return instantiate(cfg.diffusion, model=model, betas=betas, ema=ema)


def build_sampler(node: DictConfig) -> tuple[Callable[..., torch.Tensor], float]:
    """The sampler function of a `sampler` config node, and its classifier-free guidance scale (a setting of
    the noise predictor the sampler calls, not of the sampler itself)."""
    settings = OmegaConf.to_container(node, resolve=True)
    guidance_scale = settings.pop("guidance_scale", 0.0)
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) or guidance_scale < 0:
        raise ConfigError(f"sampler.guidance_scale={guidance_scale!r} must be a number >= 0 (0 = no guidance)")
    return instantiate(settings), float(guidance_scale)


def build_optimizer(cfg: DictConfig, params) -> torch.optim.Optimizer:
    """The `optimizer` node applied to `params`; bad hyperparameters are reported under their config keys.

    `fused: null` means fused where the optimizer has a fused kernel (Adam, AdamW and SGD do, on CPU and CUDA):
    one kernel per step, and a non-finite step can be skipped without a host sync.
    """
    node = cfg.optimizer
    fused = node.get("fused")
    if fused is not None and not isinstance(fused, bool):
        raise ConfigError(f"optimizer.fused={fused!r} must be true, false or null (fused where available)")
    for key in ("lr", "eps", "weight_decay"):
        value = node.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
            raise ConfigError(f"optimizer.{key}={value!r} must be a number >= 0")
    betas = node.get("betas")
    if betas is not None and (not OmegaConf.is_list(betas) or len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas)):
        raise ConfigError(f"optimizer.betas={betas!r} must be two numbers in [0, 1), e.g. [0.9, 0.999]")
    if "fused" in node and fused is None:
        node = OmegaConf.merge(node, {"fused": True})
    try:
        return instantiate(node)(params=params)
    except (TypeError, ValueError) as error:  # whatever else the optimizer's own checks refuse
        settings = ", ".join(f"optimizer.{k}={v!r}" for k, v in node.items() if not k.startswith("_"))
        raise ConfigError(f"the optimizer {node._target_} refused its settings ({settings}): {error}") from error


def load_diffusion(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[GaussianDiffusion, dict[str, Any]]:
    """A trained diffusion (network and EMA weights) and the checkpoint's full contents, ready to sample."""
    state = load_checkpoint(path, map_location=device)
    try:
        diffusion = build_diffusion(OmegaConf.create(state["config"]))
    except Exception as error:  # a config from another version, or edited by hand
        raise CheckpointError(f"checkpoint={path}: the config stored in it does not build a model: {error}") from error
    try:
        diffusion.model.load_state_dict(state["model"])
        if diffusion.ema is not None and state.get("ema") is not None:
            diffusion.ema.load_state_dict(state["ema"])
    except (RuntimeError, TypeError, AttributeError) as error:
        first_line = str(error).splitlines()[0]
        raise CheckpointError(
            f"checkpoint={path}: its weights are not those of the model its config describes ({first_line})"
        ) from error
    return diffusion.to(device).eval(), state
