"""Builds a diffusion model from a composed config, or from a checkpoint (whose config travels inside it)."""

from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ddpm.checkpoint import load_checkpoint
from ddpm.diffusion import GaussianDiffusion
from ddpm.ema import EMA
from ddpm.errors import CheckpointError


def build_diffusion(cfg: DictConfig) -> GaussianDiffusion:
    """Network -> noise schedule -> EMA copy -> diffusion, from the model, schedule, trainer and diffusion nodes."""
    model = instantiate(cfg.model)
    betas = instantiate(cfg.schedule)
    trainer = cfg.trainer
    ema = (
        EMA(model, decay=trainer.ema_decay, start=trainer.ema_start, update_rate=trainer.ema_update_rate)
        if trainer.use_ema
        else None
    )
    return instantiate(cfg.diffusion, model=model, betas=betas, ema=ema)


def load_diffusion(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[GaussianDiffusion, dict[str, Any]]:
    """A trained diffusion (network and EMA weights) and the checkpoint's full contents, ready to sample."""
    state = load_checkpoint(path, map_location=device)
    diffusion = build_diffusion(OmegaConf.create(state["config"]))
    try:
        diffusion.model.load_state_dict(state["model"])
        if diffusion.ema is not None and state.get("ema") is not None:
            diffusion.ema.load_state_dict(state["ema"])
    except RuntimeError as error:
        raise CheckpointError(f"checkpoint={path}: its weights do not fit the model in its config: {error}") from error
    return diffusion.to(device).eval(), state
