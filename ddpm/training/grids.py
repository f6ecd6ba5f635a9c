"""Sample grids during training: the same images' noise every time, so successive grids differ only by the weights."""

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ddpm.diffusion.gaussian import GaussianDiffusion
from ddpm.diffusion.generation import draw_images
from ddpm.io.images import save_grid


class SampleGrids:
    """One row per class when class-conditional, else columns x columns images, written to `directory` and
    handed to the logger."""

    def __init__(
        self,
        diffusion: GaussianDiffusion,
        sampler: Callable[..., torch.Tensor],
        *,
        guidance_scale: float,
        columns: int,
        num_classes: int | None,
        directory: Path,
        logger: Any,
        device: torch.device,
    ):
        self.diffusion, self.sampler, self.guidance_scale = diffusion, sampler, guidance_scale
        self.columns, self.directory, self.logger, self.device = columns, directory, logger, device
        self.labels = torch.arange(num_classes).repeat_interleave(columns) if num_classes else None
        self.count = columns * (num_classes or columns)
        self.latest: tuple[int, Path] | None = None  # (step, path) of the newest grid

    def draw(self, step: int, name: str | None = None) -> Path:
        [batch] = draw_images(
            self.diffusion,
            self.sampler,
            images=range(self.count),
            batch_size=self.count,
            seed=0,
            device=self.device,
            labels=self.labels,
            guidance_scale=self.guidance_scale,
        )
        path = save_grid(batch.images, self.directory / (name or f"step_{step:07d}.png"), columns=self.columns)
        self.logger.log_image("samples", path, step, caption=f"step {step}")
        self.latest = (step, path)
        return path

    def final(self, step: int) -> Path:
        """final.png: a copy of this step's grid when there is one, else a new grid."""
        if self.latest is not None and self.latest[0] == step:
            return Path(shutil.copyfile(self.latest[1], self.directory / "final.png"))
        return self.draw(step, "final.png")
