"""The Gaussian diffusion process: schedule buffers, forward noising, the training loss, the posterior."""

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ddpm.ema import EMA
from ddpm.errors import ConfigError
from ddpm.fast_paths import autocast, resolve_precision
from ddpm.samplers import Generators, NoisePredictor, ddpm_ancestral, gaussian_like

LOSSES = {"l1": F.l1_loss, "l2": F.mse_loss}


def extract(a: torch.Tensor, t: torch.Tensor, x_shape: torch.Size) -> torch.Tensor:
    """a[t] for a batch of timesteps, shaped to broadcast against a batch of images."""
    return a.gather(0, t).reshape(t.shape[0], *([1] * (len(x_shape) - 1)))


class GaussianDiffusion(nn.Module):
    """DDPM around a noise-prediction network, with the seed project's Python API.

    `diffusion(x, y)` is the training loss; `diffusion.sample(n, device, y)` draws images in [-1, 1]
    (with the EMA weights when an EMA is attached); `diffusion.update_ema()` advances the EMA.
    """

    def __init__(
        self,
        model: nn.Module,
        betas: torch.Tensor,
        image_size: int,
        channels: int,
        loss_type: str = "l2",
        ema: EMA | None = None,
    ):
        super().__init__()
        if loss_type not in LOSSES:
            raise ConfigError(f"trainer.loss_type={loss_type!r} is not one of {list(LOSSES)}")
        self.model = model
        self.ema = ema
        self.image_size = image_size
        self.channels = channels
        self.loss_type = loss_type

        betas = betas.double()
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        alphas_cumprod_prev = F.pad(alphas_cumprod[:-1], (1, 0), value=1.0)
        posterior_variance = betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod)

        def buffer(name: str, value: torch.Tensor) -> None:
            # Computed in float64, stored in float32; rebuilt from the config, so not saved.
            self.register_buffer(name, value.float(), persistent=False)

        buffer("betas", betas)
        buffer("alphas_cumprod", alphas_cumprod)
        buffer("sqrt_alphas_cumprod", alphas_cumprod.sqrt())
        buffer("sqrt_one_minus_alphas_cumprod", (1 - alphas_cumprod).sqrt())
        buffer("posterior_variance", posterior_variance)
        # The posterior variance is 0 at t = 0; clip the log so it stays finite.
        buffer("posterior_log_variance_clipped", torch.cat([posterior_variance[1:2], posterior_variance[1:]]).log())
        buffer("posterior_mean_coef1", betas * alphas_cumprod_prev.sqrt() / (1 - alphas_cumprod))
        buffer("posterior_mean_coef2", (1 - alphas_cumprod_prev) * (1 - betas).sqrt() / (1 - alphas_cumprod))

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t ~ q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I), given the noise."""
        return (
            extract(self.sqrt_alphas_cumprod, t, x0.shape) * x0
            + extract(self.sqrt_one_minus_alphas_cumprod, t, x0.shape) * noise
        )

    def q_posterior(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0) (Ho et al. 2020, Eq. 7)."""
        mean = (
            extract(self.posterior_mean_coef1, t, x_t.shape) * x0
            + extract(self.posterior_mean_coef2, t, x_t.shape) * x_t
        )
        variance = extract(self.posterior_variance, t, x_t.shape)
        log_variance = extract(self.posterior_log_variance_clipped, t, x_t.shape)
        return mean, variance, log_variance

    def training_noise(
        self, batch: int, device: torch.device | str, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Uniform timesteps and Gaussian noise for `batch` training images."""
        t = torch.randint(0, self.num_timesteps, (batch,), device=device, generator=generator)
        noise = torch.randn((batch, self.channels, self.image_size, self.image_size), device=device,
                            generator=generator)  # fmt: skip
        return t, noise

    def losses(
        self,
        x0: torch.Tensor,
        y: torch.Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-sample epsilon-prediction loss at uniformly drawn timesteps (Ho et al. 2020, Eq. 14).

        `t` and `noise` are drawn from `generator` unless given (data-parallel ranks draw them for the whole
        global batch and each take their share, so the result does not depend on the number of ranks).
        """
        if t is None or noise is None:
            t, noise = self.training_noise(x0.shape[0], x0.device, generator)
        noise = noise.to(x0.dtype)
        predicted = self.model(self.q_sample(x0, t, noise), t, y)
        per_element = LOSSES[self.loss_type](predicted, noise, reduction="none")
        return per_element.flatten(1).mean(dim=1)

    def forward(
        self, x0: torch.Tensor, y: torch.Tensor | None = None, t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """The mean training loss over the batch."""
        return self.losses(x0, y, t=t, noise=noise).mean()

    def update_ema(self) -> None:
        """Advances the EMA of the network's weights by one training step (no-op without an EMA)."""
        if self.ema is not None:
            self.ema.update(self.model)

    def noise_predictor(
        self, y: torch.Tensor | None = None, *, use_ema: bool = True, guidance_scale: float = 0.0,
        precision: str = "fp32",
    ) -> NoisePredictor:
        """The function (x_t, t) -> predicted noise that samplers call, with labels y bound.

        With precision bf16 or fp16 the network runs under autocast; its prediction is returned in float32, so
        the sampler's own arithmetic stays in float32.

        With guidance_scale w > 0 (classifier-free guidance, Ho & Salimans 2022) it returns
        (1 + w) eps(x, y) - w eps(x, null), both predictions from one forward pass over a doubled batch.
        """
        module = self.ema.module if (use_ema and self.ema is not None) else self.model
        precision = resolve_precision("precision", precision, self.betas.device)

        def network(x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
            with autocast(precision, x.device):
                return module(x, t, labels).to(x.dtype)

        if not guidance_scale:
            return lambda x, t: network(x, t, y)
        null_label = getattr(self.model, "null_label", None)
        if y is None or null_label is None:
            raise ConfigError(
                f"sampler.guidance_scale={guidance_scale} needs a class-conditional model trained with "
                "trainer.label_dropout > 0 (it learns the unconditional prediction from the dropped labels); "
                "this one was not"
            )
        null = torch.full_like(y, null_label)

        def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            conditional, unconditional = network(x.repeat(2, 1, 1, 1), t.repeat(2), torch.cat([y, null])).chunk(2)
            return (1 + guidance_scale) * conditional - guidance_scale * unconditional

        return guided

    def initial_noise(self, num_samples: int, device: torch.device | str, generator: Generators = None) -> torch.Tensor:
        """x_T ~ N(0, I), the starting point of every sampler (one generator per image, or one for all)."""
        shape = (num_samples, self.channels, self.image_size, self.image_size)
        return gaussian_like(torch.empty(shape, device=device, dtype=self.betas.dtype), generator)

    @torch.no_grad()
    def sample(
        self,
        num_samples: int,
        device: torch.device | str,
        y: torch.Tensor | None = None,
        *,
        use_ema: bool = True,
        generator: Generators = None,
        sampler: Callable[..., torch.Tensor] = ddpm_ancestral,
        noise: torch.Tensor | None = None,
        callback: Callable[[dict], None] | None = None,
        progress: bool = False,
        guidance_scale: float = 0.0,
        precision: str = "fp32",
    ) -> torch.Tensor:
        """Draws `num_samples` images in [-1, 1]; y (shape [num_samples]) picks classes when conditional.

        `noise` replaces the starting x_T drawn from `generator`; `sampler` is any function of the
        signature in `ddpm.samplers`; `guidance_scale` > 0 applies classifier-free guidance; `precision` bf16 or
        fp16 runs the network under autocast. `generator` may be one generator per image (as
        `ddpm.generation` passes), so that each image's randomness does not depend on the others in its batch.
        """
        if noise is None:
            noise = self.initial_noise(num_samples, device, generator)
        with _eval_mode(self), tqdm(desc="sampling", disable=not progress) as bar:

            def on_step(state: dict) -> None:
                bar.total = state["steps"]  # the sampler tells how many network calls it makes
                bar.update()
                if callback is not None:
                    callback(state)

            predict_noise = self.noise_predictor(y, use_ema=use_ema, guidance_scale=guidance_scale, precision=precision)
            x = sampler(predict_noise, noise, self.betas, generator=generator, callback=on_step)
        return x.clamp(-1, 1)

    @torch.no_grad()
    def sample_diffusion_sequence(
        self,
        num_samples: int,
        device: torch.device | str,
        y: torch.Tensor | None = None,
        *,
        use_ema: bool = True,
        generator: Generators = None,
    ) -> list[torch.Tensor]:
        """The whole reverse chain [x_T, x_{T-1}, ..., x_0] on the CPU, as in the seed's API."""
        noise = self.initial_noise(num_samples, device, generator)
        sequence = [noise.cpu()]
        self.sample(
            num_samples, device, y, use_ema=use_ema, generator=generator, noise=noise,
            callback=lambda state: sequence.append(state["x"].cpu()),
        )  # fmt: skip
        return sequence


@contextlib.contextmanager
def _eval_mode(module: nn.Module):
    """Sampling never uses dropout or batch statistics; training mode is restored afterwards."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)
