"""Random images that take the same path through PIL and the transforms as CIFAR-10's: for benchmarks, which
must time the data pipeline without needing the dataset."""

import torch
from einops import rearrange
from PIL import Image
from torch.utils.data import Dataset

from ddpm.data.transforms import to_model_range


class SyntheticImages(Dataset):
    """uint8 images (N, C, H, W) and labels, served as (float tensor in [-1, 1], label) like the file datasets."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, random_flip: bool = True):
        self.pixels = rearrange(images, "n c h w -> n h w c").numpy()
        self.labels = labels.tolist()
        channels, size = images.shape[1], images.shape[2]
        self.transform = to_model_range(size, channels, random_flip)
        self.mode = "L" if channels == 1 else "RGB"

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        pixels = self.pixels[index]
        image = Image.fromarray(pixels[..., 0] if self.mode == "L" else pixels, mode=self.mode)
        return self.transform(image), self.labels[index]
