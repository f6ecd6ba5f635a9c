"""Each noise schedule against its formula, written here independently with NumPy."""

import math

import numpy as np
import pytest
import torch

from ddpm.config.errors import ConfigError
from ddpm.diffusion.schedules import cosine_betas, dns_betas, dnst_betas, linear_betas


@pytest.mark.parametrize("steps", [1000, 250, 21])
def test_linear_matches_linspace_scaled_to_the_number_of_steps(steps):
    expected = np.linspace(1e-4 * 1000 / steps, 0.02 * 1000 / steps, steps)
    betas = linear_betas(steps, 1e-4, 0.02)
    assert betas.dtype == torch.float64 and betas.shape == (steps,)
    np.testing.assert_allclose(betas.numpy(), expected, rtol=1e-12)


@pytest.mark.parametrize("steps", [1000, 100])
def test_cosine_matches_nichol_dhariwal(steps):
    s = 0.008

    def f(t):
        return math.cos((t / steps + s) / (1 + s) * math.pi / 2) ** 2

    expected = [min(1 - (f(t) / f(0)) / (f(t - 1) / f(0)), 0.999) for t in range(1, steps + 1)]
    np.testing.assert_allclose(cosine_betas(steps).numpy(), expected, rtol=1e-10)
    assert cosine_betas(steps)[-1] == pytest.approx(0.999)  # the last beta is clipped


@pytest.mark.parametrize("steps", [1000, 21])
def test_dns_is_the_quadratic_with_offset_5(steps):
    low, high = 1e-4 * 1000 / steps, 0.02 * 1000 / steps
    expected = [low + (high - low) * ((i + 5) / (steps + 1 + 5)) ** 2 for i in range(steps)]
    np.testing.assert_allclose(dns_betas(steps).numpy(), expected, rtol=1e-12)


def test_dnst_is_dns_with_offset_t():
    steps = 1000
    low, high = 1e-4, 0.02
    expected = [low + (high - low) * ((i + steps) / (2 * steps + 1)) ** 2 for i in range(steps)]
    np.testing.assert_allclose(dnst_betas(steps).numpy(), expected, rtol=1e-12)


@pytest.mark.parametrize("schedule", [linear_betas, dns_betas, dnst_betas, cosine_betas])
def test_every_schedule_gives_a_valid_diffusion(schedule):
    betas = schedule(1000)
    assert torch.all(betas > 0) and torch.all(betas < 1)
    alpha_bar = torch.cumprod(1 - betas, 0)
    assert alpha_bar[-1] < 0.05  # nearly pure noise at t = T


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"low": 0.02, "high": 0.02}, "schedule.low"),
        ({"low": -1e-4}, "schedule.low"),
        ({"high": 1.5}, "schedule.high"),
        ({"num_timesteps": 0}, "schedule.num_timesteps"),
        ({"num_timesteps": 20}, "schedule.high"),  # 0.02 * 1000 / 20 = 1: alpha_T would be 0
    ],
)
@pytest.mark.parametrize("schedule", [linear_betas, dns_betas, dnst_betas])
def test_bad_ranges_are_rejected_naming_the_key(schedule, kwargs, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        schedule(**kwargs)


def test_cosine_rejects_zero_steps():
    with pytest.raises(ConfigError, match="schedule.num_timesteps=0"):
        cosine_betas(0)
