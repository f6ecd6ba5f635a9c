"""q_sample, the loss, the posterior, the ancestral sampler and the EMA against closed forms."""

import math

import pytest
import torch
from torch import nn

from ddpm.config.errors import ConfigError
from ddpm.diffusion.gaussian import GaussianDiffusion
from ddpm.diffusion.objectives import denoiser, extract
from ddpm.diffusion.samplers import ddpm_ancestral
from ddpm.diffusion.schedules import linear_betas
from ddpm.model.ema import EMA


class AffineNoisePredictor(nn.Module):
    """eps(x, t, y) = a * x + b * t (+ y): simple enough to compute the loss by hand."""

    num_classes = None

    def __init__(self, a: float = 0.5, b: float = 0.01):
        super().__init__()
        self.a, self.b = a, b
        self.weight = nn.Parameter(torch.ones(()))

    def forward(self, x, t, y=None):
        out = self.weight * self.a * x + self.b * t.float().reshape(-1, 1, 1, 1)
        return out if y is None else out + y.float().reshape(-1, 1, 1, 1)


def make_diffusion(loss_type="l2", steps=100, model=None):
    return GaussianDiffusion(
        model or AffineNoisePredictor(), linear_betas(steps), image_size=4, channels=2, loss_type=loss_type
    )


def alpha_bar(steps=100):
    return torch.cumprod(1 - linear_betas(steps), 0)


def test_q_sample_is_the_closed_form_marginal():
    diffusion = make_diffusion()
    x0, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([0, 50, 99])
    ab = alpha_bar()[t].float().reshape(-1, 1, 1, 1)
    expected = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    torch.testing.assert_close(diffusion.q_sample(x0, t, noise), expected)


@pytest.mark.parametrize("loss_type", ["l2", "l1"])
def test_loss_is_the_epsilon_prediction_error_at_drawn_timesteps(loss_type):
    diffusion = make_diffusion(loss_type)
    x0 = torch.randn(5, 2, 4, 4)
    losses = diffusion.losses(x0, generator=torch.Generator().manual_seed(3))

    # The same draws, in the order the loss makes them: timesteps first, then the noise.
    generator = torch.Generator().manual_seed(3)
    t = torch.randint(0, 100, (5,), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    ab = alpha_bar()[t].float().reshape(-1, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    error = 0.5 * x_t + 0.01 * t.float().reshape(-1, 1, 1, 1) - noise
    expected = (error**2 if loss_type == "l2" else error.abs()).flatten(1).mean(1)
    torch.testing.assert_close(losses, expected)
    assert losses.shape == (5,)


def test_forward_is_the_mean_loss_and_trains_the_model():
    diffusion = make_diffusion()
    loss = diffusion(torch.randn(4, 2, 4, 4))
    assert loss.ndim == 0
    loss.backward()
    assert diffusion.model.weight.grad is not None


def test_posterior_matches_the_gaussian_product_formula():
    diffusion = make_diffusion()
    betas = linear_betas(100)
    ab = alpha_bar()
    x0, x_t = torch.randn(2, 2, 4, 4), torch.randn(2, 2, 4, 4)
    t = torch.tensor([1, 70])
    mean, variance, log_variance = diffusion.q_posterior(x0, x_t, t)
    for row, step in enumerate(t.tolist()):
        ab_prev = ab[step - 1]
        coef_x0 = betas[step] * ab_prev.sqrt() / (1 - ab[step])
        coef_xt = (1 - ab_prev) * (1 - betas[step]).sqrt() / (1 - ab[step])
        torch.testing.assert_close(mean[row], (coef_x0 * x0[row] + coef_xt * x_t[row]).float())
        expected_variance = betas[step] * (1 - ab_prev) / (1 - ab[step])
        assert variance[row].flatten()[0].item() == pytest.approx(expected_variance.item(), rel=1e-5)
        assert log_variance[row].flatten()[0].item() == pytest.approx(math.log(expected_variance), rel=1e-5)


def test_extract_broadcasts_per_sample_constants():
    values = torch.arange(10.0)
    out = extract(values, torch.tensor([2, 7]), torch.Size([2, 3, 4, 4]))
    assert out.shape == (2, 1, 1, 1) and out.flatten().tolist() == [2.0, 7.0]


def test_ancestral_sampler_follows_algorithm_2_step_by_step():
    betas = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    predict = lambda x, t: 0.3 * x + 0.1 * t.float().reshape(-1, 1, 1, 1)
    x_T = torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    out = ddpm_ancestral(denoiser(predict, "eps", betas), x_T, betas, generator=torch.Generator().manual_seed(1))

    alphas = 1 - betas
    ab = torch.cumprod(alphas, 0)
    generator = torch.Generator().manual_seed(1)
    x = x_T.clone()
    for t in (2, 1, 0):
        eps = predict(x, torch.full((2,), t))
        x = (x - (betas[t] / (1 - ab[t]).sqrt()).item() * eps) / alphas[t].sqrt().item()
        if t > 0:
            x = x + betas[t].sqrt().item() * torch.randn(x.shape, generator=generator)
    torch.testing.assert_close(out, x)


def test_sampling_is_deterministic_given_a_generator_and_reports_every_step():
    diffusion = make_diffusion(steps=25)
    steps = []
    first = diffusion.sample(
        3, "cpu", generator=torch.Generator().manual_seed(5), callback=lambda s: steps.append(s["t"])
    )
    second = diffusion.sample(3, "cpu", generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(first, second)
    assert steps == list(range(24, -1, -1))
    assert first.shape == (3, 2, 4, 4) and first.abs().max() <= 1


def test_sample_diffusion_sequence_holds_the_whole_chain():
    diffusion = make_diffusion(steps=30)
    sequence = diffusion.sample_diffusion_sequence(2, "cpu", generator=torch.Generator().manual_seed(0))
    assert len(sequence) == 31 and all(x.shape == (2, 2, 4, 4) for x in sequence)


def test_sampling_uses_eval_mode_and_restores_training_mode():
    seen = []

    class Recorder(AffineNoisePredictor):
        def forward(self, x, t, y=None):
            seen.append(self.training)
            return super().forward(x, t, y)

    diffusion = GaussianDiffusion(Recorder(), torch.tensor([0.1, 0.2, 0.3]), image_size=4, channels=2)
    diffusion.train()
    diffusion.sample(1, "cpu", use_ema=False)
    assert seen == [False, False, False] and diffusion.training


def test_unknown_loss_type_names_the_key():
    with pytest.raises(ConfigError, match=r"trainer\.loss_type='huber'"):
        make_diffusion("huber")


def test_ema_copies_before_start_then_averages_with_the_decay():
    model = nn.Linear(2, 2)
    ema = EMA(model, decay=0.9, start=2, update_rate=1)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)  # update 1 < start: copy
    torch.testing.assert_close(ema.module.weight, torch.ones(2, 2))
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update(model)  # update 2: 1 + (3 - 1) * 0.1
    torch.testing.assert_close(ema.module.weight, torch.full((2, 2), 1.2))
    assert not ema.module.weight.requires_grad


def test_ema_update_rate_skips_steps_and_the_counter_survives_the_state_dict():
    model = nn.Linear(2, 2)
    ema = EMA(model, decay=0.5, start=0, update_rate=2)
    before = ema.module.weight.clone()
    with torch.no_grad():
        model.weight.add_(2.0)
    ema.update(model)  # call 1 of 2: skipped
    torch.testing.assert_close(ema.module.weight, before)
    ema.update(model)
    torch.testing.assert_close(ema.module.weight, before + 1.0)
    restored = EMA(nn.Linear(2, 2), decay=0.5, start=0, update_rate=2)
    restored.load_state_dict(ema.state_dict())
    assert restored.num_updates == 2
    torch.testing.assert_close(restored.module.weight, ema.module.weight)


def test_diffusion_sampling_prefers_the_ema_weights():
    model = AffineNoisePredictor()
    diffusion = GaussianDiffusion(model, linear_betas(50), 4, 2, ema=EMA(model, start=10))
    with torch.no_grad():
        model.weight.fill_(10.0)  # the live weights drift; the EMA copy keeps the old ones
    a = diffusion.sample(2, "cpu", generator=torch.Generator().manual_seed(0))
    b = diffusion.sample(2, "cpu", generator=torch.Generator().manual_seed(0), use_ema=False)
    assert not torch.allclose(a, b)
