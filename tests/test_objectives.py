"""The prediction targets, loss weightings, learned variances and the variational bound against closed forms:
conversions, the exact denoiser of Gaussian data expressed in every target, the x0-space weighting, the KL and
discretized-likelihood terms, the bound of Gaussian data, and learned-variance and respaced sampling."""

import math

import mpmath
import pytest
import torch
from conftest import compose_config
from torch import nn

from ddpm.config.errors import ConfigError
from ddpm.diffusion import objectives
from ddpm.diffusion.bound import bound_term, prior_bits
from ddpm.diffusion.build import build_diffusion
from ddpm.diffusion.gaussian import GaussianDiffusion
from ddpm.diffusion.objectives import PREDICTIONS, denoiser, eps_and_x0, training_target
from ddpm.diffusion.samplers import ddim, ddpm_ancestral, dpm_solver, heun

SHAPE = (64, 1, 2, 2)


def betas_of(num_timesteps=40):
    return torch.linspace(1e-3, 0.3, num_timesteps, dtype=torch.float64)


def scales(betas, t):
    ab = torch.cumprod(1 - betas.double(), 0)[t]
    return ab.sqrt().reshape(-1, 1, 1, 1), (1 - ab).sqrt().reshape(-1, 1, 1, 1)


# --- conversions ---------------------------------------------------------------------------------------------


def test_conversions_between_eps_x0_and_v_are_the_closed_forms():
    generator = torch.Generator().manual_seed(0)
    x0, eps = (
        torch.randn(SHAPE, generator=generator, dtype=torch.float64),
        torch.randn(SHAPE, generator=generator, dtype=torch.float64),
    )
    t = torch.randint(0, 40, (SHAPE[0],), generator=generator)
    alpha, sigma = scales(betas_of(), t)
    x_t = alpha * x0 + sigma * eps
    v = training_target("v", x0, eps, alpha, sigma)
    torch.testing.assert_close(v, alpha * eps - sigma * x0)
    torch.testing.assert_close(alpha * x_t - sigma * v, x0)  # Salimans & Ho 2022, Sec. 4
    for prediction in PREDICTIONS:
        got_eps, got_x0 = eps_and_x0(prediction, training_target(prediction, x0, eps, alpha, sigma), x_t, alpha, sigma)
        torch.testing.assert_close(got_eps, eps)
        torch.testing.assert_close(got_x0, x0)


MEAN, STD = 0.3, 0.5  # the toy data: every pixel N(MEAN, STD^2), independently


def gaussian_posterior(x_t, alpha, sigma):
    """E[x0 | x_t] and E[eps | x_t] for x0 ~ N(MEAN, STD^2): the exact denoiser."""
    x0 = MEAN + alpha * STD**2 * (x_t - alpha * MEAN) / (alpha**2 * STD**2 + sigma**2)
    return x0, (x_t - alpha * x0) / sigma


def exact_network(prediction, betas):
    """The exact denoiser of the toy data, as a network predicting `prediction`."""

    def network(x_t, t):
        alpha, sigma = (s.to(x_t.dtype) for s in scales(betas, t))
        x0, eps = gaussian_posterior(x_t, alpha, sigma)
        return training_target(prediction, x0, eps, alpha, sigma)

    return network


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_the_exact_denoiser_in_every_target_gives_the_exact_posterior(prediction):
    betas = betas_of()
    x_t = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    t = torch.arange(SHAPE[0]) % 40
    got = denoiser(exact_network(prediction, betas), prediction, betas)(x_t, t)
    alpha, sigma = (s.float() for s in scales(betas, t))
    x0, eps = gaussian_posterior(x_t, alpha, sigma)
    torch.testing.assert_close(got.x0, x0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.eps, eps, rtol=1e-5, atol=1e-5)


SAMPLERS = {
    "ddpm": lambda d, x, b, g: ddpm_ancestral(d, x, b, generator=g),
    "ddpm_respaced": lambda d, x, b, g: ddpm_ancestral(d, x, b, steps=9, variance="fixed_small", generator=g),
    "ddim": lambda d, x, b, g: ddim(d, x, b, steps=8, clip_denoised=False),
    "dpm_solver": lambda d, x, b, g: dpm_solver(d, x, b, steps=8, clip_denoised=False),
    "dpm_solver_sde": lambda d, x, b, g: dpm_solver(d, x, b, steps=8, eta=1.0, clip_denoised=False, generator=g),
    "heun": lambda d, x, b, g: heun(d, x, b, steps=6, clip_denoised=False),
}


@pytest.mark.parametrize("name", SAMPLERS)
def test_samplers_give_the_same_images_whichever_target_the_denoiser_predicts(name):
    betas = betas_of()
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    images = {
        prediction: SAMPLERS[name](
            denoiser(exact_network(prediction, betas), prediction, betas),
            x_T,
            betas.float(),
            torch.Generator().manual_seed(3),
        )
        for prediction in PREDICTIONS
    }
    torch.testing.assert_close(images["x0"], images["eps"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(images["v"], images["eps"], rtol=1e-4, atol=1e-4)
    assert images["eps"].std() > 0.1  # images, not a collapsed constant


# --- the loss weighting ---------------------------------------------------------------------------------------


class Fixed(nn.Module):
    """A network whose output is given per call (and that has a parameter, as a network does)."""

    def __init__(self, respond, learn_sigma=False):
        super().__init__()
        self.respond, self.learn_sigma = respond, learn_sigma
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, x, t, y=None):
        return self.respond(x, t)


@pytest.mark.parametrize("weighting, gamma", [("min_snr", 5.0), ("min_snr", 0.5), ("uniform", 5.0)])
def test_min_snr_weights_every_target_alike_in_x0_space(weighting, gamma):
    """The same x0 error costs the same under min_snr whatever the target; uniform is each target's plain
    loss, snr, 1 and 1 + snr times the x0 error."""
    betas = betas_of().float()
    generator = torch.Generator().manual_seed(4)
    x0, noise = torch.randn(SHAPE, generator=generator), torch.randn(SHAPE, generator=generator)
    t = torch.arange(SHAPE[0]) % 40
    wrong_x0 = x0 + 0.1 * torch.randn(SHAPE, generator=generator)
    losses = {}
    for prediction in PREDICTIONS:

        def respond(x_t, t, prediction=prediction):
            alpha, sigma = (s.float() for s in scales(betas, t))
            implied_eps = (x_t - alpha * wrong_x0) / sigma
            return training_target(prediction, wrong_x0, implied_eps, alpha, sigma)

        diffusion = GaussianDiffusion(
            Fixed(respond), betas, image_size=2, channels=1, prediction=prediction, weighting=weighting, snr_gamma=gamma
        )
        losses[prediction] = diffusion.losses(x0, t=t, noise=noise)
    ab = torch.cumprod(1 - betas.double(), 0)[t]
    snr = ab / (1 - ab)
    x0_error = ((wrong_x0 - x0) ** 2).flatten(1).mean(1).double()
    if weighting == "min_snr":
        for prediction in PREDICTIONS:
            torch.testing.assert_close(
                losses[prediction].double(), snr.clamp(max=gamma) * x0_error, rtol=2e-3, atol=1e-6
            )
    else:
        torch.testing.assert_close(losses["eps"].double(), snr * x0_error, rtol=2e-3, atol=1e-6)
        torch.testing.assert_close(losses["x0"].double(), x0_error, rtol=2e-3, atol=1e-6)
        torch.testing.assert_close(losses["v"].double(), (1 + snr) * x0_error, rtol=2e-3, atol=1e-6)


# --- the terms of the bound ----------------------------------------------------------------------------------


def test_normal_kl_is_the_closed_form():
    m1, lv1, m2, lv2 = 0.3, math.log(0.2), -0.5, math.log(1.7)
    expected = math.log(math.sqrt(1.7) / math.sqrt(0.2)) + (0.2 + (0.3 + 0.5) ** 2) / (2 * 1.7) - 0.5
    got = objectives.normal_kl(
        torch.tensor([m1], dtype=torch.float64), lv1, torch.tensor([m2], dtype=torch.float64), lv2
    )
    assert got.item() == pytest.approx(expected, rel=1e-12)


def reference_log_likelihood(x: float, mean: float, scale: float) -> float:
    """log of the N(mean, scale^2) mass of x's 8-bit bin, in 300-digit arithmetic."""
    mpmath.mp.dps = 300
    x, mean, scale, half = mpmath.mpf(x), mpmath.mpf(mean), mpmath.mpf(scale), mpmath.mpf(1) / 255
    low = -mpmath.inf if x <= -1 + 1e-9 else (x - half - mean) / scale
    high = mpmath.inf if x >= 1 - 1e-9 else (x + half - mean) / scale
    if low > 0:  # the upper tail, by symmetry: there Phi(high) - Phi(low) is 1 - 1 to 300 digits
        low, high = -high, -low
    return float(mpmath.log(mpmath.ncdf(high) - mpmath.ncdf(low)))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_discretized_gaussian_log_likelihood_of_a_known_image(dtype):
    """Every level of an 8-bit image, the two end bins, and means far in either tail (where a plain difference
    of CDFs rounds to 0 and its log to -inf)."""
    levels = torch.tensor([0, 1, 17, 127, 128, 200, 254, 255], dtype=torch.float64) / 127.5 - 1
    cases = [(x, mean, scale) for x in levels.tolist() for mean, scale in ((0.1, 0.05), (-0.9, 0.3), (0.0, 0.004))]
    cases += [(0.5, -0.7, 0.02), (-0.5, 0.9, 0.03), (0.2, 0.2, 1e-3)]  # 60 and 47 scales into the tails; a sharp bin
    x, mean, scale = (torch.tensor(column, dtype=dtype) for column in zip(*cases, strict=True))
    got = objectives.discretized_gaussian_log_likelihood(x, mean, scale.log())
    expected = torch.tensor([reference_log_likelihood(*case) for case in cases], dtype=torch.float64)
    assert torch.isfinite(got).all()
    tolerance = 1e-9 if dtype == torch.float64 else 2e-4
    torch.testing.assert_close(got.double(), expected, rtol=tolerance, atol=tolerance)


def test_the_bound_of_gaussian_data_under_its_exact_model_is_the_analytic_value():
    """With the exact posterior mean E[x0 | x_t] and the fixed variance beta~, each KL term's expectation is
    0.5 * c1^2 Var[x0 | x_t] / beta~ (Ho et al. 2020, Eq. 7), and the prior term is exact per sample."""
    betas = betas_of(20).float()
    diffusion = GaussianDiffusion(
        Fixed(exact_network("eps", betas)), betas, image_size=2, channels=1, variance="fixed_small"
    )
    generator = torch.Generator().manual_seed(5)
    x0 = MEAN + STD * torch.randn(4096, 1, 2, 2, generator=generator, dtype=torch.float64).float()
    ab = torch.cumprod(1 - betas.double(), 0)
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    for step in (1, 7, 19):
        t = torch.full((x0.shape[0],), step)
        noise = torch.randn(x0.shape, generator=generator)
        x_t = diffusion.q_sample(x0, t, noise)
        output = diffusion.model(x_t, t)
        got = bound_term(diffusion, x0, x_t, t, output, 0.0).double().mean() * math.log(2)
        c1 = ab_prev[step].sqrt() * betas[step].double() / (1 - ab[step])
        posterior_x0_variance = STD**2 * (1 - ab[step]) / (ab[step] * STD**2 + 1 - ab[step])
        beta_tilde = betas[step].double() * (1 - ab_prev[step]) / (1 - ab[step])
        expected = 0.5 * c1**2 * posterior_x0_variance / beta_tilde
        assert got.item() == pytest.approx(expected.item(), rel=0.05)
    prior = prior_bits(diffusion, x0).double() * math.log(2)
    a_T, s2_T = ab[-1], 1 - ab[-1]
    exact = 0.5 * (a_T * (x0.double() ** 2).flatten(1).mean(1) + s2_T - 1 - torch.log(s2_T))
    torch.testing.assert_close(prior, exact, rtol=1e-4, atol=1e-7)


def test_the_hybrid_loss_is_the_simple_loss_plus_lambda_T_times_the_bound_term_with_the_mean_stopped():
    betas = betas_of(20).float()
    generator = torch.Generator().manual_seed(6)
    x0, noise = torch.randn(SHAPE, generator=generator), torch.randn(SHAPE, generator=generator)
    t = torch.arange(SHAPE[0]) % 20
    mean_output = nn.Parameter(torch.randn(SHAPE, generator=generator))
    variance_output = nn.Parameter(0.5 * torch.randn(SHAPE, generator=generator))
    model = Fixed(lambda x, t: torch.cat([mean_output, variance_output], dim=1), learn_sigma=True)
    diffusion = GaussianDiffusion(model, betas, image_size=2, channels=1, variance="learned_range", vlb_weight=0.01)
    loss = diffusion.losses(x0, t=t, noise=noise)
    simple = ((mean_output - noise) ** 2).flatten(1).mean(1)
    x_t = diffusion.q_sample(x0, t, noise)
    bound = bound_term(diffusion, x0, x_t, t, mean_output, objectives.variance_fraction(variance_output))
    torch.testing.assert_close(loss, simple + 0.01 * 20 * bound)
    loss.sum().backward()
    simple_gradient = torch.autograd.grad(simple.sum(), mean_output)[0]
    torch.testing.assert_close(mean_output.grad, simple_gradient)  # the bound does not move the mean
    assert variance_output.grad.abs().sum() > 0


# --- learned variances in sampling ---------------------------------------------------------------------------


@pytest.mark.parametrize("pinned, fixed", [(1.0, "fixed_large"), (-1.0, "fixed_small")])
@pytest.mark.parametrize("steps", [None, 7])
def test_a_learned_variance_pinned_to_an_end_samples_as_the_fixed_variance(pinned, fixed, steps):
    betas = betas_of(30).float()
    mean = exact_network("eps", betas)
    learned = GaussianDiffusion(
        Fixed(lambda x, t: torch.cat([mean(x, t), torch.full_like(x, pinned)], 1), True),
        betas,
        image_size=2,
        channels=1,
        variance="learned_range",
    )
    fixed_diffusion = GaussianDiffusion(Fixed(mean), betas, image_size=2, channels=1, variance=fixed)
    images = [
        d.sample(
            8,
            "cpu",
            generator=torch.Generator().manual_seed(7),
            sampler=lambda *a, **k: ddpm_ancestral(*a, steps=steps, **k),
        )
        for d in (learned, fixed_diffusion)
    ]
    torch.testing.assert_close(images[0], images[1], rtol=1e-5, atol=1e-5)
    pinned_by_sampler = fixed_diffusion.sample(
        8,
        "cpu",
        generator=torch.Generator().manual_seed(7),
        sampler=lambda *a, **k: ddpm_ancestral(*a, steps=steps, variance=fixed, **k),
    )
    torch.testing.assert_close(pinned_by_sampler, images[1])


def test_respaced_ancestral_sampling_over_every_timestep_is_algorithm_2():
    """steps=T against Ho et al. 2020, Algorithm 2 written out in the noise form, for both fixed variances."""
    betas = betas_of(25)
    network = exact_network("eps", betas)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(8))
    ab = torch.cumprod(1 - betas, 0)
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    for variance, sigma2 in (("fixed_large", betas), ("fixed_small", betas * (1 - ab_prev) / (1 - ab))):
        generator = torch.Generator().manual_seed(9)
        x = x_T.clone()
        for t in range(24, -1, -1):
            eps = network(x, torch.full((SHAPE[0],), t))
            x = (x - betas[t] / (1 - ab[t]).sqrt() * eps) / (1 - betas[t]).sqrt()
            if t > 0:
                x = x + sigma2[t].sqrt() * torch.randn(SHAPE, generator=generator)
        got = ddpm_ancestral(
            denoiser(network, "eps", betas),
            x_T,
            betas.float(),
            steps=25,
            variance=variance,
            generator=torch.Generator().manual_seed(9),
        )
        torch.testing.assert_close(got, x.float(), rtol=1e-4, atol=1e-4)


# --- config ------------------------------------------------------------------------------------------------


def config_error(*overrides):
    cfg = compose_config("experiment=quickstart", *overrides)
    with pytest.raises(Exception) as caught:
        build_diffusion(cfg)
    error = caught.value
    while not isinstance(error, ConfigError) and error.__cause__ is not None:  # Hydra's instantiate wraps it
        error = error.__cause__
    assert isinstance(error, ConfigError), caught.value
    return str(error)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["diffusion.prediction=score"], "diffusion.prediction='score' is not one of ['eps', 'x0', 'v']"),
        (["diffusion.weighting=snr"], "diffusion.weighting='snr' is not one of ['uniform', 'min_snr']"),
        (
            ["diffusion.variance=learned"],
            "diffusion.variance='learned' is not one of ['fixed_large', 'fixed_small', 'learned_range']",
        ),
        (["diffusion.snr_gamma=-1"], "diffusion.snr_gamma=-1 must be a finite number >= 0"),
        (
            ["diffusion.weighting=min_snr", "diffusion.snr_gamma=0"],
            "diffusion.snr_gamma=0 must be > 0 with diffusion.weighting=min_snr",
        ),
        (["diffusion.vlb_weight=nan"], "diffusion.vlb_weight=nan must be a finite number >= 0"),
        (["diffusion.variance=learned_range"], "diffusion.variance='learned_range' with model.learn_sigma=false"),
        (["model.learn_sigma=true"], "diffusion.variance='fixed_large' with model.learn_sigma=true"),
        (["model.learn_sigma=maybe"], "model.learn_sigma='maybe'"),
    ],
)
def test_bad_objective_options_name_the_key_the_value_and_what_is_allowed(overrides, message):
    assert message in config_error(*overrides)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_the_objective_options_compose(prediction):
    cfg = compose_config(
        "experiment=quickstart",
        f"diffusion.prediction={prediction}",
        "diffusion.weighting=min_snr",
        "diffusion.variance=learned_range",
        "model.learn_sigma=true",
    )
    diffusion = build_diffusion(cfg)
    assert (diffusion.prediction, diffusion.weighting, diffusion.variance) == (prediction, "min_snr", "learned_range")
    assert diffusion.model.out_conv.out_channels == 2 * cfg.dataset.channels
    x0 = torch.rand(2, cfg.dataset.channels, cfg.dataset.image_size, cfg.dataset.image_size) * 2 - 1
    loss = diffusion(x0, torch.tensor([1, 2]))
    assert torch.isfinite(loss)


# --- end to end: a v-prediction run with learned variances, its likelihood and its samples -------------------


@pytest.fixture(scope="module")
def v_run(tmp_path_factory):
    """A 3-step quickstart with v-prediction, learned variances, min-SNR weighting and the bound at the end."""
    from conftest import TINY_QUICKSTART
    from main_in_process import run_in_process

    root = tmp_path_factory.mktemp("v_run")
    run_in_process(
        *TINY_QUICKSTART,
        "schedule=cosine",
        "schedule.num_timesteps=20",
        "trainer.iterations=3",
        "trainer.batch_size=8",
        "diffusion.prediction=v",
        "diffusion.weighting=min_snr",
        "diffusion.variance=learned_range",
        "model.learn_sigma=true",
        "trainer.nll_at_end=true",
        "trainer.sample_at_end=true",
        f"hydra.run.dir={root / 'train'}",
    )
    return root


def test_a_v_prediction_run_with_learned_variances_records_its_objective_and_its_likelihood(v_run):
    import json

    from ddpm.diffusion.build import load_diffusion

    summary = json.loads((v_run / "train" / "summary.json").read_text())
    assert 0 < summary["nll_bits_per_dim"] < 50
    assert (v_run / "train" / "samples" / "final.png").is_file()
    diffusion, _ = load_diffusion(v_run / "train" / "checkpoints" / "last.pt")
    assert (diffusion.prediction, diffusion.weighting, diffusion.variance) == ("v", "min_snr", "learned_range")
    assert diffusion.model.learn_sigma


@pytest.mark.parametrize("timesteps", [1, 2, 4, 25, 100, 998, 999, None])
def test_bound_quadrature_covers_every_kl_term_once(timesteps):
    from ddpm.evaluation.likelihood import bound_quadrature

    points, weights = bound_quadrature(1000, timesteps)
    assert len(points) == min(timesteps or 999, 999) and points == sorted(set(points))
    assert 1 <= points[0] and points[-1] <= 999 and sum(weights) == 999 and min(weights) >= 1
    if timesteps is None or timesteps >= 999:
        assert points == list(range(1, 1000)) and set(weights) == {1}


def test_bound_quadrature_estimates_terms_that_fall_off_like_the_bounds_own():
    """A trained model's KL terms fall off roughly like 1/t from t = 1 (its first term is about a tenth of the
    bound): 100 of 999 terms give the sum to 2%, where 100 evenly spaced ones would give twice the sum."""
    from ddpm.evaluation.likelihood import bound_quadrature

    exact = sum(1 / t for t in range(1, 1000))
    points, weights = bound_quadrature(1000, 100)
    assert sum(weight / t for t, weight in zip(points, weights, strict=True)) == pytest.approx(exact, rel=0.025)
    evenly = [round(1 + i * 998 / 99) for i in range(100)]
    assert sum(1 / t for t in evenly) * 999 / 100 > 1.9 * exact


def test_evaluate_nll_prints_bits_per_dim_with_its_terms_and_estimates_with_fewer_timesteps(v_run, capfd):
    import json

    from main_in_process import run_main_in_process

    checkpoint = v_run / "train" / "checkpoints" / "last.pt"
    results = {}
    for name, extra in (("exact", []), ("estimate", ["eval.nll_timesteps=4"])):
        code, output = run_main_in_process(
            [
                "task=evaluate",
                f"checkpoint={checkpoint}",
                "eval.nll=true",
                "eval.fid=false",
                "eval.device=cpu",
                "eval.nll_num_images=30",
                *extra,
                f"hydra.run.dir={v_run / name}",
            ],
            capfd,
        )
        assert code == 0, output
        assert "bits/dim on 30 test images" in output
        results[name] = json.loads((v_run / name / "metrics.json").read_text())["nll"]
    exact, estimate = results["exact"], results["estimate"]
    assert exact["exact"] and exact["term_timesteps"] == list(range(20)) and exact["num_images"] == 30
    assert len(exact["terms_bits_per_dim"]) == 20 and exact["terms_bits_per_dim"][0] == exact["decoder_bits_per_dim"]
    assert exact["bits_per_dim"] == pytest.approx(
        exact["prior_bits_per_dim"] + exact["decoder_bits_per_dim"] + sum(exact["terms_bits_per_dim"][1:]), rel=1e-6
    )
    assert not estimate["exact"] and "an estimate" in estimate["note"] and estimate["timesteps_evaluated"] == 5
    assert estimate["decoder_bits_per_dim"] == pytest.approx(exact["decoder_bits_per_dim"])  # the same noise for L_0
    assert estimate["term_timesteps"] == [0, 1, 4, 10, 19] and sum(estimate["term_weights"][1:]) == 19
    assert estimate["bits_per_dim"] == pytest.approx(exact["bits_per_dim"], rel=0.5)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["eval.fid=false"], "eval.fid=false and eval.nll=false leave nothing to compute"),
        (["eval.nll=true", "eval.samples=x.npz"], "eval.nll=true with eval.samples=x.npz"),
        (["eval.nll=true", "eval.nfe_sweep=[5]"], "eval.nll=true runs in one job"),
        (["eval.nll_timesteps=0"], "eval.nll_timesteps=0 must be >= 1"),
        (["trainer.nll_timesteps=0"], "trainer.nll_timesteps=0 must be >= 1"),
        (["trainer.nll_at_end=maybe"], "trainer.nll_at_end='maybe'"),
    ],
)
def test_bad_likelihood_settings_name_the_key(overrides, message, capfd, tmp_path):
    from main_in_process import run_main_in_process

    task = [] if overrides[0].startswith("trainer.") else ["task=evaluate", "checkpoint=missing.pt"]
    code, output = run_main_in_process(
        ["experiment=quickstart", "logger=none", *task, *overrides, f"hydra.run.dir={tmp_path}"], capfd
    )
    assert code == 1 and message in output and "Traceback" not in output
    assert sum(line.startswith("[ERROR]") or "[ERROR]" in line for line in output.splitlines()) == 1
