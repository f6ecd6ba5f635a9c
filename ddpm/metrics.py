"""Sample-quality metrics: FID, Inception Score, precision/recall, and the feature extractors behind them.

The metric functions are pure (NumPy in, numbers out). A feature extractor is any object with

    extractor(images) -> (features [N, D], logits [N, C])      images: uint8 tensor, N x 3 x H x W

and a `name` (used in the file name of cached reference statistics). `InceptionFeatures` is the one the
papers use (TensorFlow's 2015 Inception-v3 through torch-fidelity, whose outputs match the TensorFlow
reference); `TinyExtractor` is a small random network for tests and quick CPU checks only.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn as nn

from ddpm.errors import ConfigError, DatasetNotFoundError

log = logging.getLogger(__name__)

# What torch-fidelity downloads (torch_fidelity.feature_extractor_inceptionv3.URL_INCEPTION_V3); repeated here
# so the error for a machine without internet can name it without importing torch-fidelity first.
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
INCEPTION_WEIGHTS_FILE = INCEPTION_WEIGHTS_URL.rsplit("/", 1)[1]


# ----------------------------------------------------------------------------------------------- statistics


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The mean and covariance (unbiased, rows are samples) of features [N, D], in float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"features must be [N, D] with N >= 2, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)): the FID between two Gaussians.

    As in the reference implementation (TTUR / pytorch-fid): when the product is singular (fewer samples than
    dimensions), `eps` is added to both diagonals; the imaginary parts that sqrtm's rounding leaves are dropped,
    but large ones mean the result is wrong and raise.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different dimensions: {mu1.shape} vs {mu2.shape}")
    diff = mu1 - mu2
    with warnings.catch_warnings():  # a singular product warns; it is checked (and fixed) just below
        warnings.simplefilter("ignore")
        covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        log.warning("FID: sigma1 * sigma2 is singular; adding %g to the diagonal of both covariances", eps)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: sqrtm has an imaginary component of {np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)  # no overflow in exp
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def inception_score(scores: np.ndarray, splits: int = 10, from_logits: bool = True) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))), the mean and standard deviation over `splits` consecutive splits.

    `scores` are class logits [N, C] (or probabilities, from_logits=False). The splits are taken in order, as
    in the reference: shuffle images sorted by class first (the evaluate task does).
    """
    scores = np.asarray(scores, dtype=np.float64)
    probs = _softmax(scores) if from_logits else scores
    if len(probs) < splits:
        raise ValueError(f"inception_score needs at least splits={splits} samples, got {len(probs)}")
    values = []
    for part in np.array_split(probs, splits):
        marginal = part.mean(axis=0, keepdims=True)
        # 0 * log 0 = 0: confident one-hot predictions are a valid input.
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(part > 0, part * (np.log(part) - np.log(marginal)), 0.0)
        values.append(np.exp(terms.sum(axis=1).mean()))
    return float(np.mean(values)), float(np.std(values))


def _kth_neighbour_radii(features: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    """Distance of every row to its k-th nearest other row (the row itself, at distance 0, is skipped)."""
    radii = []
    for start in range(0, len(features), batch_size):
        distances = torch.cdist(features[start : start + batch_size], features)
        radii.append(distances.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def _fraction_inside(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, batch_size: int) -> float:
    """The fraction of `points` inside at least one ball (centre, radius): the k-NN estimate of a manifold."""
    inside = 0
    for start in range(0, len(points), batch_size):
        distances = torch.cdist(points[start : start + batch_size], centres)
        inside += int((distances <= radii[None, :]).any(dim=1).sum())
    return inside / len(points)


def precision_recall(
    real_features: np.ndarray, fake_features: np.ndarray, k: int = 3, batch_size: int = 1000, device: str = "cpu"
) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019): precision is the fraction of generated
    samples inside the real manifold (union of k-NN balls around real features), recall the fraction of real
    samples inside the generated manifold. Quadratic in N: pass subsets (the task uses eval.pr_num_samples)."""
    if min(len(real_features), len(fake_features)) <= k:
        raise ValueError(f"precision_recall needs more than k={k} samples of each kind")
    real = torch.as_tensor(np.asarray(real_features), dtype=torch.float32, device=device)
    fake = torch.as_tensor(np.asarray(fake_features), dtype=torch.float32, device=device)
    real_radii = _kth_neighbour_radii(real, k, batch_size)
    fake_radii = _kth_neighbour_radii(fake, k, batch_size)
    precision = _fraction_inside(fake, real, real_radii, batch_size)
    recall = _fraction_inside(real, fake, fake_radii, batch_size)
    return precision, recall


# ----------------------------------------------------------------------------------------- feature extractors


def _as_rgb_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 N x C x H x W with C = 1 or 3 -> N x 3 x H x W (gray repeated, the usual convention)."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected uint8 images N x (1 or 3) x H x W, got {images.dtype} {tuple(images.shape)}")
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


class InceptionFeatures:
    """The Inception-v3 of the FID/IS papers (TensorFlow's 2015 graph, ported by torch-fidelity): 2048-d pool3
    features for FID and precision/recall, 1008 unbiased logits for the Inception Score.

    `weights_path` is the torch-fidelity weights file; None downloads it once into torch's hub cache.
    """

    name = "inception-v3-compat"

    def __init__(self, weights_path: str | None = None, device: str | torch.device = "cpu"):
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

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
            target = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
            raise DatasetNotFoundError(
                f"the Inception-v3 weights could not be downloaded ({type(error).__name__}: {error}). Without "
                f"internet access, download {INCEPTION_WEIGHTS_FILE} from {INCEPTION_WEIGHTS_URL} on another "
                f"machine and either pass fid.extractor.weights_path=/path/to/{INCEPTION_WEIGHTS_FILE} or place it "
                f"at {target} (torch's hub cache, where it is looked for first)."
            ) from error
        self.device = torch.device(device)
        self.network.to(self.device)

    @staticmethod
    def _check_weights_file(path: str) -> None:
        """An existing file of plain tensors: torch-fidelity loads it with weights_only=False, which would run
        any code a crafted file carries, so it is read safely here first."""
        if not Path(path).is_file():
            raise ConfigError(
                f"fid.extractor.weights_path={path} does not exist. Download {INCEPTION_WEIGHTS_FILE} from "
                f"{INCEPTION_WEIGHTS_URL} and place it at {path} (or point fid.extractor.weights_path at it)."
            )
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ConfigError(
                f"fid.extractor.weights_path={path} is not a weights file of plain tensors ({error}); "
                f"expected {INCEPTION_WEIGHTS_FILE} from {INCEPTION_WEIGHTS_URL}"
            ) from error

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        features, logits = self.network(_as_rgb_uint8(images).to(self.device))
        return features.double().cpu().numpy(), logits.double().cpu().numpy()


class TinyExtractor(nn.Module):
    """A stand-in for tests and quick CPU checks: a fixed random conv net (seeded, no weights file).

    Its FID and IS are NOT comparable with any paper: they only order samples of the same setup, and they
    make the whole evaluate path runnable without the Inception weights.
    """

    def __init__(
        self,
        dim: int = 32,
        num_classes: int = 10,
        seed: int = 0,
        device: str | torch.device = "cpu",
        weights_path: str | None = None,
    ):
        """`weights_path` is ignored: accepted so that `fid.extractor._target_=ddpm.metrics.TinyExtractor` alone
        swaps it in for InceptionFeatures, whose node has a weights_path (`fid=tiny` is the preset)."""
        super().__init__()
        self.name = f"tiny-d{dim}-c{num_classes}-s{seed}"
        generator = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(16, dim, 3, stride=2, padding=1)
        self.head = nn.Linear(dim, num_classes)
        with torch.no_grad():  # initialized from our own generator: the same network everywhere
            for parameter in self.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
        self.requires_grad_(False)
        self.eval()
        self.device = torch.device(device)
        self.to(self.device)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        x = _as_rgb_uint8(images).to(self.device).float() / 127.5 - 1
        x = torch.tanh(self.conv2(torch.tanh(self.conv1(x))))
        features = x.mean(dim=(2, 3))
        return features.double().cpu().numpy(), self.head(features).double().cpu().numpy()
