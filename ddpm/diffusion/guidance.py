"""Classifier-free guidance (Ho & Salimans 2022): one network's conditional and unconditional outputs combined."""

from collections.abc import Callable

import torch

from ddpm.config.errors import ConfigError

Network = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def classifier_free_guidance(
    network: Network, y: torch.Tensor | None, null_label: int | None, scale: float, channels: int
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """(x_t, t) -> (1 + w) out(x, y) - w out(x, null) with w = `scale`, both from one forward pass of `network`
    over a doubled batch. The same combination serves eps, x0 or v, since each is affine in the others at a given
    x_t; a learned variance (the output's channels past `channels`) is the conditional one.

    The null label is the class the network learned the unconditional prediction under (trainer.label_dropout);
    a network without one cannot be guided."""
    if y is None or null_label is None:
        raise ConfigError(
            f"sampler.guidance_scale={scale} needs a class-conditional model trained with "
            "trainer.label_dropout > 0 (it learns the unconditional prediction from the dropped labels); "
            "this one was not"
        )
    null = torch.full_like(y, null_label)

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        conditional, unconditional = network(x.repeat(2, 1, 1, 1), t.repeat(2), torch.cat([y, null])).chunk(2)
        mean = (1 + scale) * conditional[:, :channels] - scale * unconditional[:, :channels]
        return torch.cat([mean, conditional[:, channels:]], dim=1)

    return guided
