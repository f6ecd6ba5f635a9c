"""Turning model-range tensors into pictures on disk."""

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] tensors (N, C, H, W) -> uint8 array (N, H, W, C), the guided-diffusion npz convention."""
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).numpy()


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(path)


MIN_CELL_PIXELS = 64


def cell_scale(height: int, width: int, min_pixels: int = MIN_CELL_PIXELS) -> int:
    """The whole factor that makes an image's shorter side at least `min_pixels` (1 for images that are)."""
    return max(1, math.ceil(min_pixels / min(height, width)))


def save_grid(images: torch.Tensor, path: str | Path, columns: int) -> Path:
    """Saves images as one PNG grid, `columns` per row (row i holds class i in class-conditional grids).

    Small images are enlarged by a whole factor, nearest neighbour, so that every cell is at least 64 pixels
    and a grid of 16 x 16 digits reads without zooming; the images themselves (samples.npz) keep their size."""
    from torchvision.utils import make_grid  # here: importing torchvision takes seconds (it loads torch._dynamo)

    images = images.detach().float().cpu()
    scale = cell_scale(*images.shape[-2:])
    if scale > 1:
        images = torch.nn.functional.interpolate(images, scale_factor=scale, mode="nearest")
    grid = make_grid(images, nrow=columns, padding=2, pad_value=1.0)
    path = Path(path)
    _save(to_uint8(grid[None])[0], path)
    return path


def save_images(images: np.ndarray, out_dir: str | Path, labels: np.ndarray | None = None, start: int = 0) -> None:
    """Saves uint8 (N, H, W, C) images as numbered PNG files, with the class in the name when known."""
    for offset, image in enumerate(images):
        index = start + offset
        name = f"{index:06d}.png" if labels is None else f"{index:06d}_class{int(labels[offset])}.png"
        _save(image, Path(out_dir) / name)


def save_sequence_strip(sequence: list[torch.Tensor], path: str | Path, frames: int) -> Path:
    """One row per image, `frames` columns from x_T to x_0: the denoising process at a glance."""
    picks = np.linspace(0, len(sequence) - 1, frames).round().astype(int)
    chosen = torch.stack([sequence[i] for i in picks], dim=1)  # (N, frames, C, H, W)
    return save_grid(chosen.flatten(0, 1), path, columns=frames)
