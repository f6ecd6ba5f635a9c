"""The sampler options that tests/test_samplers.py and tests/test_guidance.py pin only loosely or not at all,
each against a formula written out here, in float64, on a tiny asymmetric case:

    spaced_timesteps  hand-computed lists for T = 10 (uniform and quadratic, a rounding tie included)
    ddpm_ancestral    respaced steps (beta of the step t -> s is 1 - alpha_bar_t / alpha_bar_s) under every variance:
                      fixed_small, fixed_large, the denoiser's fixed choice, a learned fraction strictly inside (0, 1),
                      and the sampler's choice overriding the denoiser's; the posterior is Bayes' rule, not Eq. 7
    ddim              a whole stochastic (0 < eta < 1), clipped, quadratically spaced trajectory
    dpm_solver        whole 2M trajectories (eta = 0 and 0 < eta < 1) against its docstring's step, and with
                      clip_denoised the history of clipped x0 the second-order term uses
    heun              a whole clipped trajectory on quadratic spacing, and sigma_max at an exact tie s == sigma_max
    guidance          (1 + w) cond - w uncond with w = 0.3, and the learned variance taken from the conditional half

The denoiser predicts x0 as a fixed linear map of x (plus a term in t), so consecutive predictions differ and the
second-order terms matter; the settings are asymmetric so that a swapped sign, argument or comparison fails.
"""

import math

import pytest
import torch

from ddpm.diffusion import objectives
from ddpm.diffusion.guidance import classifier_free_guidance
from ddpm.diffusion.samplers import ddim, ddpm_ancestral, dpm_solver, heun, spaced_timesteps

SHAPE = (2, 1, 2, 2)
T = 10
EXACT = {"rtol": 1e-10, "atol": 1e-12}  # float64 on both sides: only rounding differs


def schedule(num_timesteps: int = T) -> torch.Tensor:
    return torch.linspace(0.02, 0.3, num_timesteps, dtype=torch.float64)


def alpha_bar(betas: torch.Tensor) -> list[float]:
    return torch.cumprod(1 - betas, 0).tolist()


def x_T(seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def linear_x0(scale: float = 0.8, seed: int = 1):
    """x0(x, t) = scale * W x + b (t + 1) / T, W a fixed random non-symmetric matrix: a denoiser whose x0 changes
    from step to step, so the multistep history and the trapezoid's end slope both matter."""
    generator = torch.Generator().manual_seed(seed)
    size = math.prod(SHAPE[1:])
    weight = scale * torch.randn(size, size, generator=generator, dtype=torch.float64) / math.sqrt(size)
    bias = 0.3 * torch.randn(size, generator=generator, dtype=torch.float64)

    def x0(x: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1)
        return (x.flatten(1) @ weight.T + bias * (t + 1) / T).reshape(x.shape)

    return x0


def noise_stream(seed: int):
    """The N(0, I) draws a sampler takes from torch.Generator().manual_seed(seed), one per noisy step, in order."""
    generator = torch.Generator().manual_seed(seed)
    return lambda: torch.randn(SHAPE, generator=generator, dtype=torch.float64)


def run(sampler, denoise, x, betas, **settings):
    """The sampler's output and the (t, x) of each callback."""
    states = []
    out = sampler(denoise, x, betas, callback=states.append, **settings)
    return out, [(s["t"], s["x"]) for s in states]


def assert_trajectory(states, expected):
    assert [t for t, _ in states] == [t for t, _ in expected]
    for (t, got), (_, want) in zip(states, expected, strict=True):
        torch.testing.assert_close(got, want, **EXACT, msg=lambda m, t=t: f"at t={t}: {m}")


def bayes_posterior(x0, x_t, ab_t: float, ab_s: float):
    """q(x_s | x_t, x0) by Bayes' rule: the prior x_s ~ N(sqrt(ab_s) x0, 1 - ab_s) times the likelihood
    x_t ~ N(sqrt(a) x_s, 1 - a), a = ab_t / ab_s; the precisions add. Independent of the closed form of
    Ho et al. 2020, Eq. 7, that the sampler uses."""
    a = ab_t / ab_s
    variance = 1 / (1 / (1 - ab_s) + a / (1 - a))
    mean = variance * (math.sqrt(ab_s) * x0 / (1 - ab_s) + math.sqrt(a) * x_t / (1 - a))
    return mean, variance


# --- spaced_timesteps ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spacing, steps, expected",
    [
        # t_i = i + round((T - steps) f(i / (steps - 1))), listed from T-1 down
        ("uniform", 4, [9, 6, 3, 0]),  # 6 * (0, 1/3, 2/3, 1) = 0, 2, 4, 6
        ("uniform", 5, [9, 7, 5, 2, 0]),  # 5 * (0, .25, .5, .75, 1): 2.5 rounds half up to 3, so 5 and not 4
        ("quadratic", 4, [9, 5, 2, 0]),  # 6 * (0, 1/9, 4/9, 1) = 0, .67, 2.67, 6
        ("quadratic", 5, [9, 6, 3, 1, 0]),  # 5 * (0, 1/16, 1/4, 9/16, 1) = 0, .31, 1.25, 2.81, 5
        ("quadratic", 3, [9, 3, 0]),  # 7 * (0, 1/4, 1) = 0, 1.75, 7
        ("uniform", 1, [9]),
    ],
)
def test_spaced_timesteps_are_the_hand_computed_lists_for_ten_timesteps(spacing, steps, expected):
    assert spaced_timesteps(T, steps, spacing) == expected


# --- ddpm_ancestral -----------------------------------------------------------------------------------------


def learned_fraction(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A variance fraction strictly inside (0, 1) that varies with the pixel and the timestep."""
    return 0.2 + 0.6 * torch.sigmoid(x + 0.1 * t.double().reshape(-1, 1, 1, 1))


def ancestral_denoiser(betas, source: str):
    """The denoiser of an x0-predicting network whose variance is `source`: none (the sampler's default),
    the diffusion's fixed beta~ (fraction 0), or learned (Nichol & Dhariwal 2021: v in [-1, 1], f = (v + 1) / 2)."""
    x0 = linear_x0()
    if source == "learned":
        network = lambda x, t: torch.cat([x0(x, t), 2 * learned_fraction(x, t) - 1], dim=1)
        return objectives.denoiser(network, "x0", betas, learned_variance=True)
    fraction = {"none": None, "fixed_small": 0.0, "fixed_0.3": 0.3}[source]
    return objectives.denoiser(x0, "x0", betas, fixed_fraction=fraction)


def reference_ancestral(x, betas, timesteps, variance: str, seed: int):
    """Respaced ancestral sampling (Nichol & Dhariwal 2021, Sec. 4) written out: the step t -> s has
    beta = 1 - ab_t / ab_s, beta~ the Bayes posterior's variance, and the learned variance
    beta^f beta~^(1 - f) (Eq. 15 as a geometric mean); the last step returns x0."""
    ab, x0_of, draw = alpha_bar(betas), linear_x0(), noise_stream(seed)
    expected = []
    for i, t in enumerate(timesteps):
        x0 = x0_of(x, t)
        if i + 1 == len(timesteps):
            x = x0
        else:
            s = timesteps[i + 1]
            mean, posterior = bayes_posterior(x0, x, ab[t], ab[s])
            beta = 1 - ab[t] / ab[s]
            if variance == "fixed_small":
                var = posterior
            elif variance == "fixed_large":
                var = beta
            elif variance == "fraction_0.3":
                var = beta**0.3 * posterior**0.7
            else:
                f = learned_fraction(x, torch.full((x.shape[0],), t))
                var = beta**f * posterior ** (1 - f)
            x = mean + var**0.5 * draw()
        expected.append((t, x))
    return expected


@pytest.mark.parametrize(
    "setting, source, variance",
    [
        ("fixed_small", "none", "fixed_small"),
        ("fixed_large", "none", "fixed_large"),
        (None, "none", "fixed_large"),  # no choice anywhere: beta, the seed's
        (None, "fixed_small", "fixed_small"),  # the diffusion's fixed choice
        (None, "fixed_0.3", "fraction_0.3"),  # a fixed fraction inside (0, 1) is interpolated, not taken as beta~
        (None, "learned", "learned"),
        ("fixed_large", "learned", "fixed_large"),  # the sampler's choice wins over the network's
        ("fixed_small", "learned", "fixed_small"),
    ],
)
def test_respaced_ancestral_steps_are_the_posterior_of_the_step_with_its_variance(setting, source, variance):
    betas, x = schedule(), x_T()
    out, states = run(
        ddpm_ancestral,
        ancestral_denoiser(betas, source),
        x,
        betas,
        steps=4,
        variance=setting,
        generator=torch.Generator().manual_seed(3),
    )
    expected = reference_ancestral(x, betas, [9, 6, 3, 0], variance, seed=3)
    assert_trajectory(states, expected)
    torch.testing.assert_close(out, expected[-1][1], **EXACT)


def test_the_three_ancestral_variances_differ_on_this_case():
    """So that the test above tells them apart: a learned fraction inside (0, 1) lies strictly between."""
    betas, x = schedule(), x_T()
    first = {
        variance: reference_ancestral(x, betas, [9, 6, 3, 0], variance, seed=3)[0][1]
        for variance in ("fixed_small", "learned", "fixed_large")
    }
    spread = {k: (v - first["fixed_small"]).abs().max().item() for k, v in first.items()}
    assert 0 < spread["learned"] < spread["fixed_large"]


# --- ddim ----------------------------------------------------------------------------------------------------


def test_stochastic_clipped_ddim_on_quadratic_spacing_is_eq_12_step_by_step():
    """Song et al. 2021, Eq. 12 with sigma^2 = eta^2 beta~ (Eq. 16), beta~ the posterior variance of the step;
    x0 clipped to [-1, 1] and eps re-derived from it. eta = 0.35 (not 0 or 1) and x0 outside [-1, 1]."""
    betas, x, eta, timesteps = schedule(), x_T(), 0.35, [9, 5, 2, 0]
    ab, x0_of, draw = alpha_bar(betas), linear_x0(scale=2.5), noise_stream(5)
    state, expected, clipped = x, [], 0
    for i, t in enumerate(timesteps):
        raw = x0_of(state, t)
        clipped += int((raw.abs() > 1).sum())
        x0 = raw.clamp(-1, 1)
        eps = (state - math.sqrt(ab[t]) * x0) / math.sqrt(1 - ab[t])
        if i + 1 == len(timesteps):
            state = x0
        else:
            s = timesteps[i + 1]
            sigma2 = eta**2 * bayes_posterior(x0, state, ab[t], ab[s])[1]
            state = math.sqrt(ab[s]) * x0 + math.sqrt(1 - ab[s] - sigma2) * eps + math.sqrt(sigma2) * draw()
        expected.append((t, state))
    assert clipped > 0  # the clipping is exercised
    out, states = run(
        ddim,
        objectives.denoiser(x0_of, "x0", betas),
        x,
        betas,
        steps=4,
        eta=eta,
        spacing="quadratic",
        generator=torch.Generator().manual_seed(5),
    )
    assert_trajectory(states, expected)
    assert out.abs().max() <= 1


# --- dpm_solver ----------------------------------------------------------------------------------------------


def reference_dpm_solver(x, betas, timesteps, eta: float, clip: bool, seed: int, x0_of):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2; with eta > 0 its SDE form, Sec. 5), the step of the
    sampler's docstring: with h = lambda_s - lambda_t, lambda = log(alpha / sigma),

        x_s = (sigma_s / sigma_t) e^(-eta h) x_t + alpha_s (1 - e^(-(1 + eta) h)) D + sigma_s sqrt(1 - e^(-2 eta h)) z

    D = x0 on the first step, then (1 + 1/(2r)) x0_t - 1/(2r) x0_prev with r = h_prev / h."""
    ab, draw = alpha_bar(betas), noise_stream(seed)
    alpha = [math.sqrt(a) for a in ab]
    sigma = [math.sqrt(1 - a) for a in ab]
    lam = [math.log(alpha[t] / sigma[t]) for t in range(len(ab))]
    expected, history = [], None
    for i, t in enumerate(timesteps):
        x0 = x0_of(x, t)
        if clip:
            x0 = x0.clamp(-1, 1)
        if i + 1 == len(timesteps):
            x = x0
        else:
            s = timesteps[i + 1]
            h = lam[s] - lam[t]
            if history is None:
                d = x0
            else:
                r = history[1] / h
                d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * history[0]
            x = (
                sigma[s] / sigma[t] * math.exp(-eta * h) * x
                + alpha[s] * (1 - math.exp(-(1 + eta) * h)) * d
                + (sigma[s] * math.sqrt(1 - math.exp(-2 * eta * h)) * draw() if eta > 0 else 0)
            )
            history = (x0, h)
        expected.append((t, x))
    return expected


@pytest.mark.parametrize("eta", [0.0, 0.4])
def test_dpm_solver_2m_trajectory_is_the_docstring_step_at_every_step(eta):
    """Every step of the trajectory, not just the first two: the history carried into the third step is the
    previous x0 (not the previous D), and with 0 < eta < 1 the partial churn's noise enters every step."""
    betas, x, x0_of = schedule(), x_T(), linear_x0()
    out, states = run(
        dpm_solver,
        objectives.denoiser(x0_of, "x0", betas),
        x,
        betas,
        steps=5,
        eta=eta,
        clip_denoised=False,
        generator=torch.Generator().manual_seed(6),
    )
    expected = reference_dpm_solver(x, betas, [9, 7, 5, 2, 0], eta, clip=False, seed=6, x0_of=x0_of)
    assert_trajectory(states, expected)
    torch.testing.assert_close(out, expected[-1][1], **EXACT)


def test_dpm_solver_with_clip_denoised_uses_the_clipped_x0_in_its_second_order_term():
    betas, x, x0_of = schedule(), x_T(scale=1.5), linear_x0(scale=2.5)
    _, states = run(dpm_solver, objectives.denoiser(x0_of, "x0", betas), x, betas, steps=4, clip_denoised=True)
    expected = reference_dpm_solver(x, betas, [9, 6, 3, 0], 0.0, clip=True, seed=0, x0_of=x0_of)
    assert_trajectory(states, expected)
    # the x0 of the first two steps, the history of the first 2M step among them, are clipped somewhere
    assert (x0_of(x, 9).abs() > 1).any() and (x0_of(states[0][1], 6).abs() > 1).any()
    unclipped = reference_dpm_solver(x, betas, [9, 6, 3, 0], 0.0, clip=False, seed=0, x0_of=x0_of)
    assert not torch.allclose(unclipped[1][1], expected[1][1])


# --- heun ------------------------------------------------------------------------------------------------------


def reference_heun(x, betas, timesteps, clip: bool, x0_of):
    """Karras et al. 2022, Algorithm 1 (S_churn = 0) in x~ = x / alpha, s = sigma / alpha, where the ODE is
    dx~/ds = eps: an Euler step, corrected by the average of the slopes at both ends; the last step gives x0.
    The callback sees the Euler point (at t) and the corrected point (at s)."""
    ab = alpha_bar(betas)
    alpha = [math.sqrt(a) for a in ab]
    s_of = [math.sqrt(1 - a) / math.sqrt(a) for a in ab]

    def slope(x, t):
        x0 = x0_of(x, t)
        if clip:
            x0 = x0.clamp(-1, 1)
        return (x - alpha[t] * x0) / math.sqrt(1 - ab[t]), x0

    expected = []
    for i, t in enumerate(timesteps):
        d, x0 = slope(x, t)
        if i + 1 == len(timesteps):
            expected.append((t, x0))
            break
        s = timesteps[i + 1]
        x_tilde = x / alpha[t]
        euler = x_tilde + (s_of[s] - s_of[t]) * d
        expected.append((t, alpha[s] * euler))
        d_end, _ = slope(alpha[s] * euler, s)
        x = alpha[s] * (x_tilde + (s_of[s] - s_of[t]) * (d + d_end) / 2)
        expected.append((s, x))
    return expected


def test_clipped_heun_on_quadratic_spacing_is_algorithm_1_with_clipped_slopes_at_both_ends():
    """clip_denoised clips the x0 of the Euler point's slope too, not only the start's."""
    betas, x, x0_of = schedule(), x_T(scale=1.5), linear_x0(scale=2.5)
    out, states = run(heun, objectives.denoiser(x0_of, "x0", betas), x, betas, steps=4, spacing="quadratic")
    expected = reference_heun(x, betas, [9, 5, 2, 0], clip=True, x0_of=x0_of)
    assert_trajectory(states, expected)
    torch.testing.assert_close(out, expected[-1][1], **EXACT)
    euler_points = [state for _, state in expected[0:-1:2]]  # evaluated at 5, 2 and 0
    assert any((x0_of(state, s).abs() > 1).any() for state, s in zip(euler_points, [5, 2, 0], strict=True))


def exact_tie_schedule():
    """The schedule and a timestep k whose s_k = sigma_k / alpha_k squares back exactly: sigma_max = s_k is a tie."""
    betas = schedule()
    ab = objectives.alphas_cumprod(betas).tolist()  # what the sampler compares, clamped as it does
    k = 7
    sigma_max = math.sqrt((1 - ab[k]) / ab[k])
    assert sigma_max**2 == (1 - ab[k]) / ab[k], "pick another k: this s_k does not square back exactly"
    return betas, k, sigma_max


@pytest.mark.parametrize(
    "nudge, start",
    [(0, 7), (-1, 6), (+1, 7)],  # s <= sigma_max: the tie is included; just below it, not
)
def test_heun_with_sigma_max_starts_at_the_last_timestep_with_s_at_most_sigma_max(nudge, start):
    betas, k, sigma_max = exact_tie_schedule()
    sigma_max = {0: sigma_max, -1: math.nextafter(sigma_max, 0), +1: math.nextafter(sigma_max, math.inf)}[nudge]
    x, x0_of = x_T(), linear_x0()
    timesteps = {7: [7, 4, 1, 0], 6: [6, 3, 1, 0]}[start]  # quadratic over start + 1 timesteps, 4 steps
    out, states = run(
        heun,
        objectives.denoiser(x0_of, "x0", betas),
        x,
        betas,
        steps=4,
        sigma_max=sigma_max,
        clip_denoised=False,
    )
    expected = reference_heun(x, betas, timesteps, clip=False, x0_of=x0_of)
    assert_trajectory(states, expected)
    torch.testing.assert_close(out, expected[-1][1], **EXACT)


# --- classifier-free guidance ----------------------------------------------------------------------------------


def labelled_network(calls: list):
    """An output of 1 mean channel and 1 variance channel that depends on the label, differently in each."""

    def network(x, t, y):
        calls.append(len(x))
        y = y.double().reshape(-1, 1, 1, 1)
        mean = x * (1 + 0.2 * y) + 0.1 * y**2 + 0.01 * t.double().reshape(-1, 1, 1, 1)
        variance = torch.tanh(0.3 * y - x)
        return torch.cat([mean, variance], dim=1)

    return network


def test_guidance_is_one_plus_w_conditional_minus_w_unconditional_with_the_conditional_variance():
    """Ho & Salimans 2022, Eq. 6 with w = 0.3: swapping the two outputs, or w and 1 - w, changes the mean; the
    learned variance channels are the conditional ones."""
    calls, w, null = [], 0.3, 10
    network = labelled_network(calls)
    x, t, y = x_T(), torch.tensor([7, 2]), torch.tensor([3, 8])
    guided = classifier_free_guidance(network, y, null, w, channels=1)(x, t)
    assert calls == [2 * len(x)]  # one forward pass over the doubled batch
    conditional, unconditional = network(x, t, y), network(x, t, torch.full_like(y, null))
    assert not torch.allclose(conditional[:, 1:], unconditional[:, 1:])
    expected_mean = 1.3 * conditional[:, :1] - 0.3 * unconditional[:, :1]
    torch.testing.assert_close(guided[:, :1], expected_mean, **EXACT)
    torch.testing.assert_close(guided[:, 1:], conditional[:, 1:], **EXACT)


def test_a_guided_denoiser_with_learned_variances_predicts_the_guided_noise_and_the_conditional_fraction():
    betas, w, null = schedule(), 0.3, 10
    network = labelled_network([])
    x, t, y = x_T(), torch.tensor([7, 2]), torch.tensor([3, 8])
    guided = classifier_free_guidance(network, y, null, w, channels=1)
    prediction = objectives.denoiser(guided, "eps", betas, learned_variance=True)(x, t)
    conditional, unconditional = network(x, t, y), network(x, t, torch.full_like(y, null))
    torch.testing.assert_close(prediction.eps, (1 + w) * conditional[:, :1] - w * unconditional[:, :1], **EXACT)
    torch.testing.assert_close(prediction.variance_fraction, (conditional[:, 1:] + 1) / 2, **EXACT)
