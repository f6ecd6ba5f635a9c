"""The randomness of a training step that belongs to the batch, not to a rank: timesteps, noise and dropped labels.

They are drawn for the whole global batch from one stream that every rank draws alike, and each rank takes its
share, so N ranks train like one process with the same batch (and a resumed run draws what the uninterrupted
one would: the stream's state is in every checkpoint).
"""

import logging

import torch

from ddpm.diffusion.gaussian import GaussianDiffusion
from ddpm.runtime.distributed import Ranks

log = logging.getLogger(__name__)


class GlobalBatchNoise:
    def __init__(
        self,
        diffusion: GaussianDiffusion,
        *,
        seed: int,
        local_batch: int,
        ranks: Ranks,
        device: torch.device,
        label_dropout: float = 0.0,
        layout: torch.memory_format = torch.contiguous_format,
    ):
        self.diffusion, self.device, self.layout, self.seed = diffusion, device, layout, seed
        self.generator = torch.Generator(device).manual_seed(seed)
        self.global_batch = local_batch * ranks.world_size
        self.share = slice(ranks.rank * local_batch, (ranks.rank + 1) * local_batch)
        self.label_dropout = label_dropout
        self.null_label = getattr(diffusion.model, "null_label", None)

    def draw(self, labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """This rank's timesteps, noise (in the training layout) and labels, some replaced by the null label
        for classifier-free guidance."""
        t, noise = self.diffusion.training_noise(self.global_batch, self.device, self.generator)
        if labels is not None and self.label_dropout > 0:  # drawn for the global batch too
            dropped = torch.rand(self.global_batch, device=self.device, generator=self.generator) < self.label_dropout
            labels = torch.where(dropped[self.share], self.null_label, labels)
        return t[self.share], noise[self.share].contiguous(memory_format=self.layout), labels

    def get_state(self) -> torch.Tensor:
        return self.generator.get_state()

    def set_state(self, state: torch.Tensor, *, step: int) -> None:
        """Continues the stream of a checkpoint written at `step`. A generator of another device type (a CUDA
        generator's state is its seed and offset, a CPU one's the whole Mersenne Twister) cannot continue it:
        the stream is then re-seeded from (seed, step), so the run goes on reproducibly but not bit for bit as
        the uninterrupted one."""
        if state.numel() != self.generator.get_state().numel():
            log.warning(
                "the checkpoint's noise stream was drawn on another device type than %s: it cannot be continued "
                "exactly, and is re-seeded from (trainer.seed=%d, step %d)",
                torch.device(self.device).type,
                self.seed,
                step,
            )
            self.generator.manual_seed(reseeded(self.seed, step))
            return
        self.generator.set_state(state.cpu())


def reseeded(seed: int, step: int) -> int:
    """The seed of a noise stream that restarts at `step`: distinct for every (seed, step)."""
    return (seed << 32) | step
