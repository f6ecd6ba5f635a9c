"""The samplers against closed forms written out here: single steps, DDIM(eta=1) == ancestral, determinism,
extreme schedules, config errors and the Hydra options."""

import functools
import math

import pytest
import torch
from conftest import compose_config
from torch import nn

from ddpm.config.errors import ConfigError
from ddpm.diffusion.build import build_sampler
from ddpm.diffusion.gaussian import GaussianDiffusion
from ddpm.diffusion.objectives import denoiser
from ddpm.diffusion.samplers import ddim, ddpm_ancestral, dpm_solver, heun

SHAPE = (2, 1, 3, 3)


def linear_map_predictor(seed: int = 0, scale: float = 0.3):
    """eps(x, t) = W x + b t / T: a fixed random linear map, deterministic and cheap."""
    generator = torch.Generator().manual_seed(seed)
    size = math.prod(SHAPE[1:])
    weight = scale * torch.randn(size, size, generator=generator) / math.sqrt(size)
    bias = 0.1 * torch.randn(size, generator=generator)

    def predict(x, t):
        assert t.dtype == torch.long and t.shape == (x.shape[0],)
        flat = x.flatten(1) @ weight.T + bias * (t.float() / 10).reshape(-1, 1)
        return flat.reshape(x.shape)

    return predict


def schedule(num_timesteps=20, low=1e-3, high=0.2):
    return torch.linspace(low, high, num_timesteps, dtype=torch.float64)


def alpha_bar(betas):
    return torch.cumprod(1 - betas.double(), 0)


def x_T(seed=0):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def eps_denoiser(predict, betas):
    """The Denoiser of a noise predictor (x, t) -> eps."""
    return denoiser(predict, "eps", betas)


def record(sampler, predict, x, betas, **kwargs):
    """The sampler's output and its callback states, for a noise predictor."""
    states = []
    out = sampler(eps_denoiser(predict, betas), x, betas, callback=states.append, **kwargs)
    return out, states


def at(predict, x, t):
    return predict(x, torch.full((x.shape[0],), t, dtype=torch.long))


# --- single steps -----------------------------------------------------------------------------------------


def test_ancestral_posterior_step_is_the_posterior_mean_plus_its_std():
    betas, predict, x = schedule(), linear_map_predictor(), x_T()
    _, states = record(
        ddpm_ancestral, predict, x, betas, variance="fixed_small", generator=torch.Generator().manual_seed(4)
    )
    ab = alpha_bar(betas)
    t = 19
    x0 = (x - (1 - ab[t]).sqrt() * at(predict, x, t)) / ab[t].sqrt()
    mean = (ab[t - 1].sqrt() * betas[t] * x0 + (1 - betas[t]).sqrt() * (1 - ab[t - 1]) * x) / (1 - ab[t])
    std = (betas[t] * (1 - ab[t - 1]) / (1 - ab[t])).sqrt()
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(states[0]["x"], (mean + std * z).float(), rtol=1e-5, atol=1e-5)
    assert [s["t"] for s in states] == list(range(19, -1, -1))


@pytest.mark.parametrize("clip", [False, True])
def test_ddim_deterministic_step_and_final_step(clip):
    betas, predict, x = schedule(10), linear_map_predictor(scale=3.0), x_T()
    out, states = record(ddim, predict, x, betas, steps=2, eta=0.0, clip_denoised=clip)
    assert [s["t"] for s in states] == [9, 0]
    ab = alpha_bar(betas)
    # t = 9 -> 0: x0 = (x - sqrt(1 - a) eps) / sqrt(a); x' = sqrt(a') x0 + sqrt(1 - a') eps
    eps = at(predict, x, 9)
    x0 = (x - (1 - ab[9]).sqrt() * eps) / ab[9].sqrt()
    if clip:
        x0 = x0.clamp(-1, 1)
        eps = (x - ab[9].sqrt() * x0) / (1 - ab[9]).sqrt()
    expected = ab[0].sqrt() * x0 + (1 - ab[0]).sqrt() * eps
    torch.testing.assert_close(states[0]["x"], expected.float())
    # t = 0 -> clean: the predicted x0, no noise
    x1 = states[0]["x"]
    final = (x1 - (1 - ab[0]).sqrt() * at(predict, x1, 0)) / ab[0].sqrt()
    torch.testing.assert_close(out, final.clamp(-1, 1).float() if clip else final.float())


def test_ddim_stochastic_step_adds_eta_times_the_posterior_std_of_fixed_noise():
    betas, predict, x, eta = schedule(10), linear_map_predictor(), x_T(), 0.6
    _, states = record(
        ddim, predict, x, betas, steps=3, eta=eta, clip_denoised=False, generator=torch.Generator().manual_seed(7)
    )
    assert [s["t"] for s in states] == [9, 5, 0]
    ab = alpha_bar(betas)
    a, a_next = ab[9], ab[5]
    eps = at(predict, x, 9)
    x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
    sigma = eta * ((1 - a_next) / (1 - a) * (1 - a / a_next)).sqrt()
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
    expected = a_next.sqrt() * x0 + (1 - a_next - sigma**2).sqrt() * eps + sigma * z
    torch.testing.assert_close(states[0]["x"], expected.float())


@pytest.mark.parametrize("clip", [False, True])
def test_dpm_solver_first_step_is_the_ddim_step(clip):
    betas, predict, x = schedule(20), linear_map_predictor(scale=3.0), x_T()
    _, dpm_states = record(dpm_solver, predict, x, betas, steps=4, clip_denoised=clip)
    _, ddim_states = record(ddim, predict, x, betas, steps=4, eta=0.0, clip_denoised=clip)
    assert [s["t"] for s in dpm_states] == [s["t"] for s in ddim_states] == [19, 13, 6, 0]
    torch.testing.assert_close(dpm_states[0]["x"], ddim_states[0]["x"])


def test_dpm_solver_2m_step_and_final_denoising_step():
    betas, predict, x = schedule(20), linear_map_predictor(), x_T()
    out, states = record(dpm_solver, predict, x, betas, steps=4, clip_denoised=False)
    ab = alpha_bar(betas)
    alpha, sigma = ab.sqrt(), (1 - ab).sqrt()
    lam = torch.log(alpha / sigma)

    def data(x, t):
        return (x - sigma[t] * at(predict, x, t)) / alpha[t]

    # Lu et al. 2022, Algorithm 2, step from t1 = 13 to t2 = 6 with the history at t0 = 19
    t0, t1, t2 = 19, 13, 6
    x1 = states[0]["x"]
    h, h_prev = lam[t2] - lam[t1], lam[t1] - lam[t0]
    r = h_prev / h
    d = (1 + 1 / (2 * r)) * data(x1, t1) - 1 / (2 * r) * data(x, t0)
    expected = sigma[t2] / sigma[t1] * x1 - alpha[t2] * (torch.exp(-h) - 1) * d
    torch.testing.assert_close(states[1]["x"], expected.float(), rtol=1e-5, atol=1e-5)
    # the final denoising step: the data prediction at t = 0
    torch.testing.assert_close(out, data(states[2]["x"], 0).float(), rtol=1e-5, atol=1e-5)
    assert len(states) == 4 and states[-1]["x"] is out


def test_dpm_solver_sde_step_and_eta_0_is_the_ode_solver():
    betas, predict, x = schedule(20), linear_map_predictor(), x_T()
    ode, ode_states = record(dpm_solver, predict, x, betas, steps=4, clip_denoised=False)
    same, _ = record(
        dpm_solver, predict, x, betas, steps=4, eta=0.0, clip_denoised=False, generator=torch.Generator().manual_seed(5)
    )
    torch.testing.assert_close(same, ode, rtol=0, atol=0)
    eta = 1.0
    _, states = record(
        dpm_solver, predict, x, betas, steps=4, eta=eta, clip_denoised=False, generator=torch.Generator().manual_seed(5)
    )
    ab = alpha_bar(betas)
    alpha, sigma = ab.sqrt(), (1 - ab).sqrt()
    lam = torch.log(alpha / sigma)
    t, s = 19, 13  # the first step: first order, D = x0
    h = lam[s] - lam[t]
    x0 = (x - sigma[t] * at(predict, x, t)) / alpha[t]
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    expected = (
        sigma[s] / sigma[t] * torch.exp(-eta * h) * x
        + alpha[s] * (1 - torch.exp(-(1 + eta) * h)) * x0
        + sigma[s] * (1 - torch.exp(-2 * eta * h)).sqrt() * z
    )
    torch.testing.assert_close(states[0]["x"], expected.float(), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(states[0]["x"], ode_states[0]["x"])


def test_heun_step_is_euler_corrected_by_the_slope_at_its_end():
    """Karras et al. 2022, Algorithm 1 (S_churn = 0) in x~ = x / alpha, s = sigma / alpha."""
    betas, predict, x = schedule(20), linear_map_predictor(), x_T()
    out, states = record(heun, predict, x, betas, steps=3, spacing="uniform", clip_denoised=False)
    assert [st["t"] for st in states] == [19, 10, 10, 0, 0] and all(st["steps"] == 5 for st in states)
    ab = alpha_bar(betas)
    alpha, s = ab.sqrt(), ((1 - ab) / ab).sqrt()
    t, u = 19, 10
    x_tilde = x.double() / alpha[t]
    d = at(predict, x, t).double()
    euler = x_tilde + (s[u] - s[t]) * d
    d_end = at(predict, (alpha[u] * euler).float(), u).double()
    corrected = x_tilde + (s[u] - s[t]) * (d + d_end) / 2
    torch.testing.assert_close(states[0]["x"], (alpha[u] * euler).float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(states[1]["x"], (alpha[u] * corrected).float(), rtol=1e-5, atol=1e-5)
    last = states[3]["x"]  # the state at t = 0; the step to s = 0 is the predicted x0
    torch.testing.assert_close(
        out, ((last - (1 - ab[0]).sqrt() * at(predict, last, 0)) / alpha[0]).float(), rtol=1e-5, atol=1e-5
    )


def test_heun_with_clip_denoised_steps_towards_the_clipped_x0():
    """clip_denoised: each slope is the noise of the x0 clipped to [-1, 1], and the last step returns that x0."""
    betas, x = schedule(20), x_T() * 3
    predict = linear_map_predictor()
    clipped, states = record(heun, predict, x, betas, steps=3, spacing="uniform")
    unclipped = heun(eps_denoiser(predict, betas), x, betas, steps=3, spacing="uniform", clip_denoised=False)
    assert clipped.abs().max() <= 1 and unclipped.abs().max() > 1
    ab = alpha_bar(betas)
    x0 = ((x.double() - (1 - ab[19]).sqrt() * at(predict, x, 19).double()) / ab[19].sqrt()).clamp(-1, 1)
    eps = (x.double() - ab[19].sqrt() * x0) / (1 - ab[19]).sqrt()
    euler = (ab[10] / ab[19]).sqrt() * x.double() + (
        (1 - ab[10]).sqrt() - (ab[10] * (1 - ab[19]) / ab[19]).sqrt()
    ) * eps
    torch.testing.assert_close(states[0]["x"], euler.float(), rtol=1e-5, atol=1e-5)


def test_heun_with_sigma_max_starts_at_the_last_timestep_below_it():
    """The cosine schedule's last timestep has s = sigma / alpha of about 2e4; sigma_max=80 starts at the last
    timestep with s <= 80 instead, and the point-mass data comes out exactly."""
    from ddpm.diffusion.schedules import cosine_betas

    betas = cosine_betas(1000)
    ab = alpha_bar(betas)
    s = ((1 - ab) / ab).sqrt()
    start = int((s <= 80).nonzero().max())
    assert s[-1] > 1e4 and start < 999
    out, states = record(heun, point_mass_predictor(betas), x_T(), betas, steps=10, sigma_max=80.0)
    assert states[0]["t"] == start and states[-1]["t"] == 0
    torch.testing.assert_close(out, torch.full(SHAPE, 0.3), rtol=0, atol=1e-3)


def test_heun_converges_at_second_order_on_gaussian_data():
    """Data N(m, c^2) per pixel: the probability-flow ODE's exact solution is x~(s) = m + (x~_T - m) * r(s) with
    r(s) = sqrt((c^2 + s^2) / (c^2 + s_T^2)); halving the step roughly quarters Heun's error (and Euler's
    halves). Compared at t = 0, before the last step's x0."""
    m, c, T = 0.2, 0.5, 1000
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    ab = alpha_bar(betas)
    alpha, sigma = ab.sqrt(), (1 - ab).sqrt()
    s = sigma / alpha

    def predict(x, t):  # E[eps | x_t] for x0 ~ N(m, c^2)
        a, g = alpha[t].reshape(-1, 1, 1, 1), sigma[t].reshape(-1, 1, 1, 1)
        return (g * (x.double() - a * m) / (a**2 * c**2 + g**2)).to(x.dtype)

    x = torch.randn(64, 1, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exact = alpha[0] * (m + (x / alpha[T - 1] - m) * ((c**2 + s[0] ** 2) / (c**2 + s[T - 1] ** 2)).sqrt())
    errors = []
    for steps in (6, 11, 21, 41):  # 5, 10, 20, 40 intervals, evenly spaced over 999 timesteps
        _, states = record(heun, predict, x, betas, steps=steps, spacing="uniform", clip_denoised=False)
        errors.append((states[-2]["x"] - exact).abs().max().item())
    ratios = [errors[i] / errors[i + 1] for i in range(len(errors) - 1)]
    assert all(3.0 < ratio < 5.5 for ratio in ratios[1:]), (errors, ratios)


def test_timestep_spacings():
    def timesteps(spacing, steps, num_timesteps=100):
        _, states = record(
            ddim, lambda x, t: torch.zeros_like(x), x_T(), schedule(num_timesteps), steps=steps, spacing=spacing
        )
        return [s["t"] for s in states]

    assert timesteps("uniform", 5) == [99, 74, 50, 25, 0]
    assert timesteps("quadratic", 5) == [99, 56, 26, 7, 0]
    assert timesteps("uniform", 1) == [99]
    for spacing in ("uniform", "quadratic"):
        assert timesteps(spacing, 100) == list(range(99, -1, -1))
        assert len(set(timesteps(spacing, 97))) == 97


# --- DDIM(eta=1) over every timestep is ancestral sampling with the posterior variance ---------------------


def test_ddim_with_eta_1_over_all_timesteps_is_ancestral_sampling_with_the_posterior_variance():
    betas = torch.linspace(1e-4, 0.05, 100, dtype=torch.float64)
    predict, x = linear_map_predictor(), x_T()
    ancestral, ancestral_states = record(
        ddpm_ancestral, predict, x, betas.float(), variance="fixed_small", generator=torch.Generator().manual_seed(11)
    )
    implicit, implicit_states = record(
        ddim,
        predict,
        x,
        betas.float(),
        steps=100,
        eta=1.0,
        clip_denoised=False,
        generator=torch.Generator().manual_seed(11),
    )
    assert [s["t"] for s in implicit_states] == [s["t"] for s in ancestral_states]
    for a, b in zip(ancestral_states, implicit_states, strict=True):
        torch.testing.assert_close(b["x"], a["x"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(implicit, ancestral, rtol=1e-5, atol=1e-5)
    beta_variance = ddpm_ancestral(
        eps_denoiser(predict, betas), x, betas.float(), generator=torch.Generator().manual_seed(11)
    )
    assert not torch.allclose(beta_variance, ancestral, atol=1e-3)  # the two variances do differ


# --- determinism and extreme schedules ---------------------------------------------------------------------

SAMPLERS = {
    "ddpm": ddpm_ancestral,
    "ddpm_posterior": functools.partial(ddpm_ancestral, variance="fixed_small"),
    "ddpm_respaced": functools.partial(ddpm_ancestral, steps=10),
    "ddim": functools.partial(ddim, steps=10),
    "ddim_eta": functools.partial(ddim, steps=10, eta=1.0, spacing="quadratic"),
    "dpm_solver": functools.partial(dpm_solver, steps=10),
    "dpm_solver_sde": functools.partial(dpm_solver, steps=10, eta=1.0),
    "heun": functools.partial(heun, steps=10),
}
STOCHASTIC = {"ddpm", "ddpm_posterior", "ddpm_respaced", "ddim_eta", "dpm_solver_sde"}


@pytest.mark.parametrize("name", SAMPLERS)
def test_samplers_are_deterministic_given_a_generator(name):
    sampler, predict, betas = SAMPLERS[name], linear_map_predictor(), schedule(30)

    def run(seed):
        return sampler(eps_denoiser(predict, betas), x_T(), betas, generator=torch.Generator().manual_seed(seed))

    torch.testing.assert_close(run(1), run(1), rtol=0, atol=0)
    assert torch.equal(run(1), run(2)) != (name in STOCHASTIC)


def point_mass_predictor(betas, c=0.3):
    """The exact noise for data that is always c: eps = (x - sqrt(alpha_bar) c) / sqrt(1 - alpha_bar)."""
    ab = alpha_bar(betas)
    signal, noise = ab.sqrt().float(), (1 - ab).sqrt().float()
    return lambda x, t: (x - signal[t].reshape(-1, 1, 1, 1) * c) / noise[t].reshape(-1, 1, 1, 1)


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize(
    "betas", [torch.linspace(1e-8, 1e-6, 1000), torch.linspace(0.5, 0.999, 1000)], ids=["tiny", "huge"]
)
def test_extreme_schedules_stay_finite(name, betas):
    sampler = SAMPLERS[name]
    out = sampler(
        eps_denoiser(point_mass_predictor(betas), betas),
        x_T(),
        betas.float(),
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.isfinite(out).all()
    if name in ("ddim", "dpm_solver", "ddpm_respaced"):  # heun: see its sigma_max
        torch.testing.assert_close(out, torch.full(SHAPE, 0.3), rtol=0, atol=1e-3)  # the exact predictor's data
        zero = sampler(eps_denoiser(lambda x, t: torch.zeros_like(x), betas), x_T(), betas.float())
        assert torch.isfinite(zero).all()


# --- config errors and the Hydra options -------------------------------------------------------------------


def never_called(x, t):
    raise AssertionError("the settings are checked before any network call")


@pytest.mark.parametrize(
    "sampler, settings, message",
    [
        (
            ddpm_ancestral,
            {"variance": "learned"},
            r"sampler\.variance='learned' is not one of \[None, 'fixed_large', 'fixed_small'\]",
        ),
        (ddpm_ancestral, {"variance": "posterior"}, r"sampler\.variance='posterior'"),
        (ddpm_ancestral, {"steps": 0}, r"sampler\.steps=0 must be an integer in 1\.\.20"),
        (heun, {"steps": 21}, r"sampler\.steps=21"),
        (heun, {"spacing": "linear"}, r"sampler\.spacing='linear'"),
        (heun, {"sigma_max": 0.0}, r"sampler\.sigma_max=0\.0 must be a number > 0"),
        (
            heun,
            {"sigma_max": 0.5, "steps": 10},
            r"sampler\.steps=10: only \d+ timesteps have s <= sampler\.sigma_max=0\.5",
        ),
        (dpm_solver, {"eta": -1.0}, r"sampler\.eta=-1\.0"),
        (ddim, {"steps": 0}, r"sampler\.steps=0 must be an integer in 1\.\.20"),
        (ddim, {"steps": 21}, r"sampler\.steps=21"),
        (ddim, {"steps": 2.5}, r"sampler\.steps=2\.5"),
        (ddim, {"eta": -0.5}, r"sampler\.eta=-0\.5"),
        (ddim, {"eta": float("nan")}, r"sampler\.eta=nan"),
        (ddim, {"spacing": "cubic"}, r"sampler\.spacing='cubic'.*uniform.*quadratic"),
        (ddim, {"clip_denoised": "yes"}, r"sampler\.clip_denoised='yes'"),
        (dpm_solver, {"steps": 0}, r"sampler\.steps=0"),
        (dpm_solver, {"steps": 100}, r"sampler\.steps=100"),
    ],
)
def test_bad_settings_name_the_key(sampler, settings, message):
    with pytest.raises(ConfigError, match=message):
        sampler(never_called, x_T(), schedule(20), **settings)


@pytest.mark.parametrize(
    "overrides, target, settings",
    [
        (["sampler=ddpm", "sampler.variance=fixed_small"], ddpm_ancestral, {"steps": None, "variance": "fixed_small"}),
        (["sampler=ddpm", "sampler.steps=25"], ddpm_ancestral, {"steps": 25, "variance": None}),
        (
            ["sampler=heun", "sampler.steps=7"],
            heun,
            {"steps": 7, "spacing": "quadratic", "sigma_max": None, "clip_denoised": True},
        ),
        (["sampler=dpm_solver_sde", "sampler.steps=12"], dpm_solver, {"steps": 12, "eta": 1.0, "clip_denoised": True}),
        (
            ["sampler=ddim", "sampler.steps=50", "sampler.eta=0.5", "sampler.spacing=quadratic"],
            ddim,
            {"steps": 50, "eta": 0.5, "spacing": "quadratic", "clip_denoised": True},
        ),
        (["sampler=dpm_solver", "sampler.steps=15"], dpm_solver, {"steps": 15, "eta": 0.0, "clip_denoised": True}),
    ],
)
def test_command_line_settings_reach_the_sampler(overrides, target, settings):
    sampler, guidance_scale = build_sampler(compose_config(*overrides).sampler)
    assert sampler.func is target and sampler.keywords == settings and guidance_scale == 0.0
    states = []
    betas = schedule(100).float()
    out = sampler(
        eps_denoiser(linear_map_predictor(), betas),
        x_T(),
        betas,
        generator=torch.Generator().manual_seed(0),
        callback=states.append,
    )
    steps = settings.get("steps") or 100
    assert out.shape == SHAPE and len(states) == (2 * steps - 1 if target is heun else steps)


class Affine(nn.Module):
    def forward(self, x, t, y=None):
        return 0.5 * x + 0.01 * t.float().reshape(-1, 1, 1, 1)


@pytest.mark.parametrize("sampler", [functools.partial(ddim, steps=5), functools.partial(dpm_solver, steps=5)])
def test_diffusion_sample_accepts_the_fast_samplers(sampler):
    diffusion = GaussianDiffusion(Affine(), schedule(50).float(), image_size=4, channels=2)
    steps = []
    images = diffusion.sample(
        3, "cpu", generator=torch.Generator().manual_seed(0), sampler=sampler, callback=lambda s: steps.append(s["t"])
    )
    assert images.shape == (3, 2, 4, 4) and images.abs().max() <= 1
    assert steps == [49, 37, 25, 12, 0]


@pytest.mark.parametrize(
    "sampler, calls",
    [
        (ddpm_ancestral, 20),
        (functools.partial(ddpm_ancestral, steps=6), 6),
        (functools.partial(ddim, steps=7), 7),
        (functools.partial(dpm_solver, steps=5), 5),
        (functools.partial(dpm_solver, steps=5, eta=1.0), 5),
        (functools.partial(heun, steps=5), 9),
    ],
)
def test_every_sampler_tells_its_callback_how_many_network_calls_it_makes(sampler, calls):
    """What diffusion.sample's progress bar is sized by: the sampler's own count, not a guess from its settings."""
    seen = []
    betas = torch.full((20,), 0.01)
    sampler(
        eps_denoiser(lambda x, t: torch.zeros_like(x), betas),
        torch.zeros(1, 1, 2, 2),
        betas,
        callback=lambda state: seen.append(state["steps"]),
    )
    assert seen == [calls] * calls
