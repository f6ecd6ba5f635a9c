"""Noise schedules: pure functions from a few numbers to float64 betas of length T.

`low` and `high` are given for T = 1000 (the DDPM paper's values) and rescaled by 1000 / T, so
a schedule with fewer steps adds the same total noise.
"""

import math

import torch

from ddpm.config.errors import ConfigError
from ddpm.config.type_checks import config_types


def _check_range(num_timesteps: int, low: float, high: float) -> None:
    if num_timesteps < 1:
        raise ConfigError(f"schedule.num_timesteps={num_timesteps} must be >= 1")
    if low < 0:
        raise ConfigError(f"schedule.low={low} must be >= 0")
    if high > 1:
        raise ConfigError(f"schedule.high={high} must be <= 1")
    if low >= high:
        raise ConfigError(f"schedule.low={low} must be < schedule.high={high}")
    if high * 1000 / num_timesteps >= 1:
        raise ConfigError(
            f"schedule.high={high} rescaled to schedule.num_timesteps={num_timesteps} is "
            f"{high * 1000 / num_timesteps:g}, but betas must stay below 1: use more timesteps or a lower high"
        )


def _scaled(num_timesteps: int, low: float, high: float) -> tuple[float, float]:
    return low * 1000 / num_timesteps, high * 1000 / num_timesteps


@config_types("schedule")
def linear_betas(num_timesteps: int = 1000, low: float = 1e-4, high: float = 0.02) -> torch.Tensor:
    """Linear betas from low to high (Ho et al. 2020, Sec. 4)."""
    _check_range(num_timesteps, low, high)
    start, end = _scaled(num_timesteps, low, high)
    return torch.linspace(start, end, num_timesteps, dtype=torch.float64)


@config_types("schedule")
def cosine_betas(num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Betas of alpha_bar(t) = cos((t/T + s) / (1 + s) * pi/2)^2 (Nichol & Dhariwal 2021, Eq. 17)."""
    if num_timesteps < 1:
        raise ConfigError(f"schedule.num_timesteps={num_timesteps} must be >= 1")
    if s <= 0:
        raise ConfigError(f"schedule.s={s} must be > 0")
    if not 0 < max_beta < 1:
        raise ConfigError(f"schedule.max_beta={max_beta} must be in (0, 1)")
    t = torch.arange(num_timesteps + 1, dtype=torch.float64)
    f = torch.cos((t / num_timesteps + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    betas = 1 - alpha_bar[1:] / alpha_bar[:-1]
    return betas.clamp(max=max_beta)


@config_types("schedule")
def dns_betas(num_timesteps: int = 1000, low: float = 1e-4, high: float = 0.02, offset: float = 5) -> torch.Tensor:
    """Dynamic noise schedule: beta_i = l + (h - l) * ((i + offset) / (T + 1 + offset))^2.

    Quadratic in i, so it adds noise slowly at first and keeps more signal in the early steps
    than the linear schedule does.
    """
    _check_range(num_timesteps, low, high)
    start, end = _scaled(num_timesteps, low, high)
    i = torch.arange(num_timesteps, dtype=torch.float64)
    return start + (end - start) * ((i + offset) / (num_timesteps + 1 + offset)) ** 2


@config_types("schedule")
def dnst_betas(num_timesteps: int = 1000, low: float = 1e-4, high: float = 0.02) -> torch.Tensor:
    """The dynamic noise schedule with offset = T: a gentler quadratic rise."""
    return dns_betas(num_timesteps, low, high, offset=num_timesteps)
