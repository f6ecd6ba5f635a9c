"""The Gaussian diffusion process: schedule buffers, forward noising, the training loss for each prediction
target and weighting (with the hybrid loss of learned variances), and the denoiser that samplers call. The terms
of the variational bound are ddpm.diffusion.bound's."""

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ddpm.config.errors import ConfigError
from ddpm.diffusion import objectives
from ddpm.diffusion.bound import bound_term
from ddpm.diffusion.guidance import classifier_free_guidance
from ddpm.diffusion.objectives import Denoiser, extract
from ddpm.diffusion.samplers import FIXED_FRACTIONS, Generators, ddpm_ancestral, gaussian_like
from ddpm.model.ema import EMA
from ddpm.runtime.fast_paths import autocast, resolve_precision

LOSSES = {"l1": F.l1_loss, "l2": F.mse_loss}


class GaussianDiffusion(nn.Module):
    """DDPM around a denoising network, with the seed project's Python API.

    `diffusion(x, y)` is the training loss; `diffusion.sample(n, device, y)` draws images in [-1, 1]
    (with the EMA weights when an EMA is attached); `diffusion.update_ema()` advances the EMA.

    The objective (see `ddpm.diffusion.objectives`): the network predicts `prediction` (eps, x0 or v), its per-sample
    loss is weighted by `weighting` (uniform, or min_snr with `snr_gamma`), and the reverse process's variance
    is `variance`: fixed_large (beta_t), fixed_small (beta~_t) or learned_range, for which the network outputs
    twice the image's channels and trains on L_simple + vlb_weight * L_vlb with the mean's gradient stopped in
    L_vlb (Nichol & Dhariwal 2021, Sec. 3.1).
    """

    def __init__(
        self,
        model: nn.Module,
        betas: torch.Tensor,
        image_size: int,
        channels: int,
        loss_type: str = "l2",
        ema: EMA | None = None,
        prediction: str = "eps",
        weighting: str = "uniform",
        snr_gamma: float = 5.0,
        variance: str = "fixed_large",
        vlb_weight: float = 0.001,
    ):
        super().__init__()
        if loss_type not in LOSSES:
            raise ConfigError(f"trainer.loss_type={loss_type!r} is not one of {list(LOSSES)}")
        objectives.check_objective(model, prediction, weighting, snr_gamma, variance, vlb_weight)
        self.prediction, self.weighting, self.snr_gamma = prediction, weighting, float(snr_gamma)
        self.variance, self.vlb_weight = variance, float(vlb_weight)
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
        # log beta_t, with beta~_1 at t = 0 as improved-diffusion has it: the decoder's log-variance at the
        # fixed_large end is then finite and not beta_0's, which would be far too small for an 8-bit bin.
        buffer("log_betas_clipped", torch.cat([posterior_variance[1:2], betas[1:]]).log())
        buffer("snr", alphas_cumprod / (1 - alphas_cumprod))

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
        noise = torch.randn(
            (batch, self.channels, self.image_size, self.image_size), device=device, generator=generator
        )
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
        """Per-sample training loss at uniformly drawn timesteps: the weighted loss of the prediction target
        (Ho et al. 2020, Eq. 14, for eps), plus vlb_weight * L_vlb with learned variances.

        `t` and `noise` are drawn from `generator` unless given (data-parallel ranks draw them for the whole
        global batch and each take their share, so the result does not depend on the number of ranks).
        """
        if t is None or noise is None:
            t, noise = self.training_noise(x0.shape[0], x0.device, generator)
        noise = noise.to(x0.dtype)
        alpha = extract(self.sqrt_alphas_cumprod, t, x0.shape)
        sigma = extract(self.sqrt_one_minus_alphas_cumprod, t, x0.shape)
        x_t = alpha * x0 + sigma * noise
        output = self.model(x_t, t, y)
        if self.learns_variance:
            output, variance_output = output.chunk(2, dim=1)
        target = objectives.training_target(self.prediction, x0, noise, alpha, sigma)
        per_sample = LOSSES[self.loss_type](output, target.to(output.dtype), reduction="none").flatten(1).mean(dim=1)
        per_sample = per_sample * objectives.loss_weight(self.weighting, self.prediction, self.snr[t], self.snr_gamma)
        if self.learns_variance:
            # L_vlb = sum over t of L_t, estimated by T L_t at the drawn t; only the variance learns from it.
            fraction = objectives.variance_fraction(variance_output)
            bound = bound_term(self, x0, x_t, t, output.detach(), fraction)
            per_sample = per_sample + self.vlb_weight * self.num_timesteps * bound
        return per_sample

    @property
    def learns_variance(self) -> bool:
        return self.variance == "learned_range"

    def network_fraction(self) -> float | None:
        """The variance fraction of a fixed-variance diffusion (1 = beta, 0 = beta~); None when learned."""
        return None if self.learns_variance else FIXED_FRACTIONS[self.variance]

    def forward(
        self,
        x0: torch.Tensor,
        y: torch.Tensor | None = None,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The mean training loss over the batch."""
        return self.losses(x0, y, t=t, noise=noise).mean()

    def update_ema(self) -> None:
        """Advances the EMA of the network's weights by one training step (no-op without an EMA)."""
        if self.ema is not None:
            self.ema.update(self.model)

    def denoiser(
        self,
        y: torch.Tensor | None = None,
        *,
        use_ema: bool = True,
        guidance_scale: float = 0.0,
        precision: str = "fp32",
    ) -> Denoiser:
        """The function (x_t, t) -> Prediction (noise, clean image, variance) that samplers call, with labels y
        bound, for whichever target the network predicts.

        With precision bf16 or fp16 the network runs under autocast; its output is returned in float32, so
        the sampler's own arithmetic stays in float32. With guidance_scale > 0 the network's output is that of
        classifier-free guidance (ddpm.diffusion.guidance).
        """
        module = self.ema.module if (use_ema and self.ema is not None) else self.model
        precision = resolve_precision("precision", precision, self.betas.device)

        def network(x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
            with autocast(precision, x.device):
                return module(x, t, labels).to(x.dtype)

        if guidance_scale:
            null_label = getattr(self.model, "null_label", None)
            output = classifier_free_guidance(network, y, null_label, guidance_scale, self.channels)
        else:
            output = lambda x, t: network(x, t, y)
        return objectives.denoiser(
            output,
            self.prediction,
            self.betas,
            learned_variance=self.learns_variance,
            fixed_fraction=self.network_fraction(),
        )

    def initial_noise(self, num_samples: int, device: torch.device | str, generator: Generators = None) -> torch.Tensor:
        """x_T ~ N(0, I), the starting point of every sampler (a stream per image, or one for all)."""
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
        signature in `ddpm.diffusion.samplers`; `guidance_scale` > 0 applies classifier-free guidance; `precision` bf16 or
        fp16 runs the network under autocast. `generator` may be one generator per image (as
        `ddpm.diffusion.generation` passes), so that each image's randomness does not depend on the others in its batch.
        """
        if noise is None:
            noise = self.initial_noise(num_samples, device, generator)
        with eval_mode(self), tqdm(desc="sampling", disable=not progress) as bar:

            def on_step(state: dict) -> None:
                bar.total = state["steps"]  # the sampler tells how many network calls it makes
                bar.update()
                if callback is not None:
                    callback(state)

            denoise = self.denoiser(y, use_ema=use_ema, guidance_scale=guidance_scale, precision=precision)
            x = sampler(denoise, noise, self.betas, generator=generator, callback=on_step)
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
            num_samples,
            device,
            y,
            use_ema=use_ema,
            generator=generator,
            noise=noise,
            callback=lambda state: sequence.append(state["x"].cpu()),
        )
        return sequence


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    """Sampling never uses dropout or batch statistics; training mode is restored afterwards."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)
