"""FID during training (`trainer.eval_rate`): a cheap FID of the EMA weights every N steps."""

from functools import partial

import numpy as np
import torch
from omegaconf import DictConfig

from ddpm.diffusion.gaussian import GaussianDiffusion
from ddpm.diffusion.generation import as_arrays, class_labels, draw_images
from ddpm.diffusion.samplers import ddim
from ddpm.evaluation.protocol import evaluation_protocol, generation_protocol
from ddpm.evaluation.reference import reference_statistics
from ddpm.evaluation.scores import image_metrics
from ddpm.evaluation.settings import FidSettings


class FidDuringTraining:
    """`num_samples` images from DDIM with `steps` steps, against the same cached reference statistics as
    task=evaluate, with the same feature extractor, on the training device. Images come from fixed seeds, so
    successive values differ only by the weights, and the training's random streams are not touched.

    A cheap FID (few images, few steps) is biased upwards and compares only with itself: `description`, logged
    next to every value, and `protocol` (written to the run directory) say which one it is."""

    SEED = 0

    def __init__(
        self,
        fid: FidSettings,
        dataset: DictConfig,
        data_dir: str,
        *,
        device: torch.device,
        num_samples: int,
        steps: int,
        batch_size: int,
        ema: bool = True,
    ):
        self.fid, self.device, self.num_samples, self.batch_size = fid, device, num_samples, batch_size
        self.extractor = fid.build_extractor(device)
        self.reference = reference_statistics(fid, dataset, data_dir, self.extractor)
        self.sampler = partial(ddim, steps=steps)
        sampler = {"name": "ddim", "steps": steps, "guidance_scale": 0.0, "settings": {"eta": 0.0}}
        record = {"sampler": sampler, "use_ema": ema, "seed": self.SEED, "precision": "fp32 (no autocast)"}
        generated = generation_protocol(num_samples, record, [self.SEED], {"during_training": True})
        self.protocol = evaluation_protocol(self.extractor, self.reference, generated)
        self.description = (
            f"{num_samples} images, ddim {steps} steps, {'EMA' if ema else 'raw'} weights, {self.extractor.name} "
            f"against {self.reference['num_images']} {self.reference['split']} images"
        )

    def images(self, diffusion: GaussianDiffusion) -> np.ndarray:
        labels = class_labels(self.num_samples, diffusion.model.num_classes)
        batches = draw_images(
            diffusion,
            self.sampler,
            images=range(self.num_samples),
            batch_size=self.batch_size,
            seed=self.SEED,
            device=self.device,
            labels=labels,
        )
        return as_arrays(batches)["arr_0"]

    def __call__(self, diffusion: GaussianDiffusion) -> float:
        metrics = image_metrics(
            self.images(diffusion),
            self.extractor,
            self.reference,
            feature_batch_size=self.fid.batch_size,
            is_splits=None,
        )
        return metrics["fid"]
