"""Shared fixtures: the project's config directory, composed the way a user's command line composes it."""

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = PROJECT_ROOT / "conf"
# The quickstart experiment (digits, CPU) shrunk to a 46k-parameter UNet: end-to-end runs in seconds.
TINY_QUICKSTART = [
    "experiment=quickstart",
    "logger=none",
    "model.base_channels=8",
    "model.channel_mults=[1,2]",
    "model.attention_resolutions=[1]",
    "model.num_groups=4",
    "sampler=ddpm",  # one call per timestep: the test schedules have fewer timesteps than the grid sampler's 50 steps
]
os.environ.setdefault("DDPM_PROJECT_ROOT", str(PROJECT_ROOT))
os.environ.setdefault("WANDB_SILENT", "true")


def compose_config(*overrides: str) -> DictConfig:
    """The config `python main.py OVERRIDES...` would run with."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def group_options(group: str) -> list[str]:
    """Every option of a config group, read from the YAML files that exist."""
    return sorted(path.stem for path in (CONF_DIR / group).glob("*.yaml"))


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A class-conditional run (the quickstart's use_labels=true) and an unconditional one, trained once per
    session for every test that reads them (none may change them: the tests that run commands on them check)."""
    from main_in_process import train_tiny_run  # it imports this module

    return {
        "cond_run": train_tiny_run(tmp_path_factory.mktemp("cond_run")),
        "uncond_run": train_tiny_run(tmp_path_factory.mktemp("uncond_run"), "trainer.use_labels=false"),
    }


@pytest.fixture(scope="module")
def files(runs, tmp_path_factory) -> Iterator[dict[str, Path]]:
    """Every bad file and folder a fault catalogue's case may name (tests/fault_files.py)."""
    from fault_files import fault_files

    yield from fault_files(runs, tmp_path_factory.mktemp("faults"))


@pytest.fixture
def compose_cfg():
    return compose_config


def user_environment() -> dict[str, str]:
    """The environment of a user's shell: without the wandb service an in-process test may have started (a
    subprocess would otherwise attach to it and share its runs) and without HYDRA_FULL_ERROR."""
    hidden = ("WANDB_SERVICE", "HYDRA_FULL_ERROR")
    return {**{k: v for k, v in os.environ.items() if k not in hidden}, "WANDB_SILENT": "true"}


def run_main(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python main.py ARGS...` in a subprocess, as a user runs it; raises with its output if it fails."""
    env = user_environment()
    result = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "main.py"), *args], capture_output=True, text=True, env=env, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(f"main.py {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def comparable(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """The weights that rounding cannot move. The key bias of attention has a gradient of exactly zero in exact
    arithmetic (a softmax does not see a shift shared by all keys), so its computed gradient is rounding noise,
    which Adam's normalization turns into full-size steps that differ with the order of the sums."""
    if name.endswith("attention.to_qkv.bias"):
        query, _, value = tensor.chunk(3)
        return torch.cat([query, value])
    return tensor
