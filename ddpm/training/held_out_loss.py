"""The test loss the loop logs (the loss on held-out images): a function of the weights alone."""

import contextlib

import torch
from torch.utils.data import DataLoader

from ddpm.diffusion.gaussian import GaussianDiffusion


class HeldOutLoss:
    """Mean loss on (the first `max_batches` batches of; 0 = all) the test split, with timesteps and noise from a
    fixed seed, so that two evaluations of the same weights give the same number."""

    def __init__(self, loader: DataLoader, *, device: torch.device, use_labels: bool, max_batches: int):
        self.loader, self.device, self.use_labels, self.max_batches = loader, device, use_labels, max_batches

    @torch.no_grad()
    def __call__(self, diffusion: GaussianDiffusion) -> float:
        generator = torch.Generator(self.device).manual_seed(0)
        was_training = diffusion.training
        diffusion.eval()
        total, count = torch.zeros((), device=self.device), 0
        with eager():
            for index, (x, y) in enumerate(self.loader):
                if self.max_batches and index >= self.max_batches:
                    break
                x = x.to(self.device, non_blocking=True)
                labels = y.to(self.device, non_blocking=True) if self.use_labels else None
                total += diffusion.losses(x, labels, generator=generator).sum()
                count += x.shape[0]
        diffusion.train(was_training)
        return total.item() / max(count, 1)


def eager() -> contextlib.AbstractContextManager:
    """A compiled network runs eagerly here: a few forward passes per log do not repay compiling an eval-mode
    graph and, for the test split's partial last batch, a dynamic one (each a full compile of the network)."""
    set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()
