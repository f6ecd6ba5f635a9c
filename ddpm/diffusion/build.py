"""Builds a diffusion model from a composed config, or from a checkpoint (whose config travels inside it)."""

import contextlib
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ddpm.config.differences import describe, differences
from ddpm.config.errors import CheckpointError, ConfigError
from ddpm.config.validation import READ_BY_THE_BUILDER, check_keys
from ddpm.diffusion import objectives
from ddpm.diffusion.gaussian import GaussianDiffusion
from ddpm.io.checkpoint import load_checkpoint
from ddpm.model.ema import EMA


def build_diffusion(cfg: DictConfig) -> GaussianDiffusion:
    """Network -> noise schedule -> EMA copy -> diffusion, from the model, schedule, trainer and diffusion nodes."""
    # A null label for classifier-free guidance exists when training drops labels.
    with named_as_typed(cfg.model, "model"):
        model = instantiate(cfg.model, null_class=cfg.trainer.get("label_dropout", 0.0) > 0)
    betas = instantiate(cfg.schedule)
    trainer = cfg.trainer
    ema = (
        EMA(model, decay=trainer.ema_decay, start=trainer.ema_start, update_rate=trainer.ema_update_rate)
        if trainer.use_ema
        else None
    )
    return instantiate(cfg.diffusion, model=model, betas=betas, ema=ema)


@contextlib.contextmanager
def named_as_typed(node: DictConfig, section: str) -> Iterator[None]:
    """A ConfigError about a key whose value comes from another key (model.image_size: ${dataset.image_size})
    names the key the user typed, dataset.image_size, instead."""
    try:
        yield
    except Exception as error:
        cause = error if isinstance(error, ConfigError) else error.__cause__  # Hydra's instantiate wraps errors
        if not isinstance(cause, ConfigError):
            raise
        message = str(cause)
        for key in node:
            child = node._get_node(key)
            source = re.fullmatch(r"\$\{([\w.]+)\}", str(child._value())) if child._is_interpolation() else None
            if source and message.startswith(f"{section}.{key}="):
                raise ConfigError(source[1] + message[len(f"{section}.{key}") :]) from error
        raise


def build_sampler(node: DictConfig, betas: torch.Tensor | None = None) -> tuple[Callable[..., torch.Tensor], float]:
    """The sampler function of a `sampler` config node, and its classifier-free guidance scale (a setting of
    the noise predictor the sampler calls, not of the sampler itself). With the schedule's `betas` the sampler
    is rehearsed once, so that every setting it checks is checked now rather than at the first grid."""
    check_keys(node, "sampler", also=READ_BY_THE_BUILDER["sampler"])
    settings = OmegaConf.to_container(node, resolve=True)
    guidance_scale = settings.pop("guidance_scale", 0.0)
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) or guidance_scale < 0:
        raise ConfigError(f"sampler.guidance_scale={guidance_scale!r} must be a number >= 0 (0 = no guidance)")
    sampler = instantiate(settings)
    if betas is not None:
        rehearse(sampler, betas)
    return sampler, float(guidance_scale)


def rehearse(sampler: Callable[..., torch.Tensor], betas: torch.Tensor) -> None:
    """One run of `sampler` on a one-pixel image with a denoiser of zeros: milliseconds, and it reaches every
    check the sampler makes of its settings against the schedule (steps, eta, spacing, ...)."""
    pixel, betas = torch.zeros(1, 1, 1, 1), betas.detach().cpu().float()
    sampler(
        objectives.denoiser(lambda x, t: torch.zeros_like(x), "eps", betas), pixel, betas, generator=torch.Generator()
    )


def check_model_fits_data(model: DictConfig, image: torch.Tensor) -> None:
    """The network takes and predicts the dataset's channels (the noise of each channel)."""
    channels = image.shape[0]
    if model.in_channels != channels:
        raise ConfigError(
            f"model.in_channels={model.in_channels}, but the dataset's images have {channels} "
            f"channel{'s' if channels > 1 else ''}: drop the override (it follows dataset.channels)"
        )
    if model.out_channels is not None and model.out_channels != model.in_channels:
        raise ConfigError(
            f"model.out_channels={model.out_channels} must equal model.in_channels={model.in_channels} "
            "(the network predicts each channel), or null; model.learn_sigma=true adds the variance channels"
        )


def load_diffusion(
    path: str | Path, device: str | torch.device = "cpu", *, trust: bool = False
) -> tuple[GaussianDiffusion, dict[str, Any]]:
    """A trained diffusion (network and EMA weights) and the checkpoint's full contents, ready to sample.
    `trust` loads a checkpoint that carries no digest (trust_checkpoint=true)."""
    state = load_checkpoint(path, map_location=device, trust=trust)
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


# What a checkpoint fixes about its model: the network, the noise schedule, the objective, and whether it takes
# class labels.
CHECKPOINT_DEFINES = ("model", "schedule", "diffusion", "trainer.use_labels")


def check_overrides_match(cfg: DictConfig, checkpoint_config: dict, checkpoint: str, *, task: str) -> None:
    """A task that builds its model from a checkpoint's config (task=sample, task=evaluate) refuses a
    command-line override of what the checkpoint defines that differs from it, rather than ignore it."""
    overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
    requested = OmegaConf.to_container(cfg, resolve=True)
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~").split("@")[0]
        for defined in CHECKPOINT_DEFINES:
            if not (key == defined or key.startswith(defined + ".") or defined.startswith(key + ".")):
                continue
            prefix = max(key, defined, key=len)  # the part of the override that the checkpoint defines
            changes = [
                change
                for change in differences(checkpoint_config, requested, (prefix.split(".")[0],))
                if change[0] == prefix or change[0].startswith(prefix + ".")
            ]
            if changes:
                name, old, new = changes[0]
                raise ConfigError(
                    f"{name}={new!r} was given, but checkpoint={checkpoint} holds a model with {name}={old!r} "
                    f"({describe(changes)}). task={task} builds the model from the checkpoint: drop {override}."
                )
