"""task=train: compose every component from the config and run the training loop."""

import json
import logging
import random
from pathlib import Path

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ddpm.build import build_diffusion
from ddpm.data.loader import evaluation_batches, training_batches
from ddpm.training import TrainSettings, resolve_device, train

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seeds Python, NumPy and torch (every device), so a run is repeatable from its config."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run(cfg: DictConfig) -> dict:
    """YAML -> settings -> data -> diffusion -> optimizer -> logger -> loop -> checkpoint and summary."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    config = OmegaConf.to_container(cfg, resolve=True)
    OmegaConf.save(config, run_dir / "config.yaml")

    settings: TrainSettings = instantiate(cfg.trainer)
    device = resolve_device(settings.device)
    seed_everything(settings.seed)

    diffusion = build_diffusion(cfg).to(device)
    train_set = instantiate(cfg.dataset, split="train")
    test_set = instantiate(cfg.dataset, split="test")
    optimizer = instantiate(cfg.optimizer)(params=diffusion.model.parameters())

    batches = training_batches(
        train_set, settings.batch_size, num_workers=settings.num_workers, seed=settings.seed,
        pin_memory=device.type == "cuda",
    )  # fmt: skip
    test_loader = (
        evaluation_batches(test_set, settings.batch_size, num_workers=settings.num_workers)
        if test_set is not None
        else None
    )
    num_parameters = sum(p.numel() for p in diffusion.model.parameters())
    log.info("model: %.2fM parameters; %d training images; device %s; run dir %s",
             num_parameters / 1e6, len(train_set), device, run_dir)  # fmt: skip

    logger = instantiate(cfg.logger)(run_dir=run_dir, config=config)
    try:
        summary = train(
            diffusion, optimizer, batches, settings,
            device=device, run_dir=run_dir, logger=logger, config=config, test_loader=test_loader,
        )  # fmt: skip
    finally:
        logger.finish()
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info("done: %d steps in %.0f s; checkpoint %s; samples %s",
             summary["steps"], summary["wall_time_s"], summary["checkpoint"], summary["sample_grid"])  # fmt: skip
    return summary
