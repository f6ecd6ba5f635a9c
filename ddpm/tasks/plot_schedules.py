"""task=plot_schedules: alpha_bar_t, beta_t and log-SNR of every noise schedule in one figure."""

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ddpm.diffusion.schedules import cosine_betas, dns_betas, dnst_betas, linear_betas

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    """Plots the four schedules at the configured num_timesteps (and low/high where a schedule has them)."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    steps = cfg.schedule.num_timesteps
    low, high = cfg.schedule.get("low", 1e-4), cfg.schedule.get("high", 0.02)
    schedules = {
        "linear": linear_betas(steps, low, high),
        "cosine": cosine_betas(steps),
        "dns": dns_betas(steps, low, high),
        "dnst": dnst_betas(steps, low, high),
    }
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, betas in schedules.items():
        alpha_bar = torch.cumprod(1 - betas, dim=0)
        t = torch.arange(1, steps + 1)
        axes[0].plot(t, alpha_bar, label=name)
        axes[1].plot(t, betas, label=name)
        axes[2].plot(t, torch.log(alpha_bar / (1 - alpha_bar)), label=name)
    for axis, title in zip(
        axes, [r"$\bar\alpha_t$", r"$\beta_t$", r"log-SNR $\log(\bar\alpha_t / (1-\bar\alpha_t))$"], strict=True
    ):
        axis.set_title(title)
        axis.set_xlabel("t")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(f"Noise schedules, T = {steps}, low = {low:g}, high = {high:g}")
    figure.tight_layout()
    path = run_dir / "schedules.png"
    figure.savefig(path, dpi=120)
    plt.close(figure)

    logger = instantiate(cfg.logger)(run_dir=run_dir, config=OmegaConf.to_container(cfg, resolve=True))
    logger.log_image("schedules", path, step=0)
    logger.finish()
    log.info("wrote %s", path)
    return {"plot": str(path)}
