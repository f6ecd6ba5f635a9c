"""Every option of every config group, and every experiment, composes and instantiates."""

import pytest
import torch
from conftest import CONF_DIR, PROJECT_ROOT, compose_config, group_options
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.utils import get_method, instantiate
from omegaconf import OmegaConf
from PIL import Image
from test_data import trust_cifar_archive, write_cifar_archive

from ddpm.diffusion.build import build_diffusion, build_sampler
from ddpm.diffusion.gaussian import GaussianDiffusion
from ddpm.diffusion.objectives import denoiser
from ddpm.evaluation.settings import FidSettings
from ddpm.io.loggers import LocalLogger
from ddpm.model.unet import UNet
from ddpm.training.settings import TrainSettings

GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name not in ("experiment", "paths"))
SMALL_MODEL = ["model.base_channels=16", "model.channel_mults=[1,2]", "model.num_groups=8"]


def test_the_groups_the_platform_promises_exist():
    assert {"model", "schedule", "dataset", "optimizer", "trainer", "logger", "sampler", "diffusion", "task"} <= set(
        GROUPS
    )


@pytest.fixture
def image_folder(tmp_path):
    for label in ("a", "b"):
        (tmp_path / "images" / label).mkdir(parents=True)
        Image.new("RGB", (20, 20), color=(10, 200, 30)).save(tmp_path / "images" / label / "x.png")
    return tmp_path / "images"


def instantiate_option(group, cfg, tmp_path):
    """Builds the group's node the way the wiring functions do, and checks what comes out."""
    node = cfg[group]
    if group == "model":
        assert isinstance(instantiate(node), UNet)
    elif group == "schedule":
        betas = instantiate(node)
        assert betas.dtype == torch.float64 and betas.shape == (node.num_timesteps,)
    elif group == "diffusion":
        assert isinstance(build_diffusion(cfg), GaussianDiffusion)
    elif group == "optimizer":
        optimizer = instantiate(node)(params=[torch.nn.Parameter(torch.zeros(2))])
        assert optimizer.param_groups[0]["lr"] == node.lr
    elif group == "trainer":
        assert isinstance(instantiate(node), TrainSettings)
    elif group == "sampler":
        sampler, guidance_scale = build_sampler(node)
        assert guidance_scale == 0.0
        betas = torch.full((100,), 0.01)
        x = sampler(denoiser(lambda x, t: torch.zeros_like(x), "eps", betas), torch.zeros(1, 1, 2, 2), betas)
        assert x.shape == (1, 1, 2, 2)
    elif group == "logger":
        logger = instantiate(node)(run_dir=tmp_path, config={"a": 1})
        assert isinstance(logger, LocalLogger)
        logger.log({"loss": 1.0}, step=1)
        logger.finish()
    elif group == "fid":
        settings = instantiate(node)
        assert isinstance(settings, FidSettings) and settings.batch_size >= 1
        if node.extractor._target_.endswith("TinyExtractor"):  # the others load a weights file
            features, logits = settings.build_extractor(torch.device("cpu"))(
                torch.zeros(2, 3, 16, 16, dtype=torch.uint8)
            )
            assert features.shape[0] == logits.shape[0] == 2
    elif group == "task":
        assert callable(get_method(node._target_))
    elif group == "dataset":
        dataset = instantiate(node, split="train")
        x, y = dataset[0]
        assert x.shape == (node.channels, node.image_size, node.image_size)
    else:
        raise AssertionError(f"no instantiation check for the new group '{group}': add one here")


def dataset_overrides(option, tmp_path, image_folder):
    if option == "folder":
        return [f"dataset.path={image_folder}", "dataset.image_size=16"]
    return []


@pytest.mark.parametrize("group, option", [(g, o) for g in GROUPS for o in group_options(g)])
def test_every_option_composes_and_instantiates(group, option, tmp_path, image_folder, monkeypatch):
    overrides = [f"{group}={option}", "logger.mode=offline" if option == "wandb" else "logger=none"]
    if group == "dataset":
        overrides += dataset_overrides(option, tmp_path, image_folder)
        if option == "cifar10":  # the tiny real-format archive of the data tests
            written = write_cifar_archive(tmp_path / "cifar")
            trust_cifar_archive(monkeypatch, written)
            overrides.append(f"paths.data_dir={written.root}")
    if group == "logger":
        overrides = [f"logger={option}"]
    cfg = compose_config(*overrides)
    instantiate_option(group, cfg, tmp_path)


@pytest.mark.parametrize("name", group_options("experiment"))
def test_every_experiment_composes_and_builds(name):
    cfg = compose_config(f"experiment={name}")
    assert isinstance(build_diffusion(cfg), GaussianDiffusion)
    instantiate(cfg.trainer)
    instantiate(cfg.optimizer)(params=[torch.nn.Parameter(torch.zeros(1))])


def test_experiments_live_in_the_top_level_experiments_directory():
    assert (PROJECT_ROOT / "experiments" / "quickstart.yaml").is_file()
    assert set(group_options("experiment")) >= {"quickstart", "ddpm_cifar10", "cifar10_cond"}


def test_ddpm_cifar10_is_the_papers_recipe():
    cfg = compose_config("experiment=ddpm_cifar10")
    assert cfg.schedule._target_.endswith("linear_betas")
    assert (cfg.schedule.low, cfg.schedule.high, cfg.schedule.num_timesteps) == (1e-4, 0.02, 1000)
    assert (cfg.model.dropout, cfg.trainer.batch_size, cfg.optimizer.lr, cfg.trainer.warmup) == (0.1, 128, 2e-4, 5000)
    assert (cfg.trainer.grad_clip, cfg.trainer.ema_decay, cfg.dataset.random_flip) == (1.0, 0.9999, True)
    assert cfg.trainer.iterations == 800_000


def test_defaults_are_the_seeds():
    cfg = compose_config()
    assert cfg.schedule._target_.endswith("dns_betas")
    assert cfg.dataset._target_.endswith("cifar10")
    assert (cfg.trainer.batch_size, cfg.optimizer.lr, cfg.model.dropout, cfg.trainer.iterations) == (
        256,
        2e-4,
        0.01,
        800_000,
    )
    assert cfg.logger.mode == "offline"  # runs without a wandb account


def test_command_line_overrides_reach_the_components():
    cfg = compose_config("schedule=dns", "model.base_channels=192", "dataset=digits")
    assert cfg.model.base_channels == 192
    assert cfg.model.in_channels == 1 and cfg.model.image_size == 16  # interpolated from the dataset


def test_unknown_group_option_lists_the_choices():
    with pytest.raises(MissingConfigException, match="dns"):
        compose_config("schedule=quadratic")


def test_unknown_key_is_rejected():
    with pytest.raises(ConfigCompositionException, match="base_channel"):
        compose_config("model.base_channel=64")


def test_every_component_yaml_has_a_target():
    for group in GROUPS:
        for option in group_options(group):
            node = OmegaConf.load(CONF_DIR / group / f"{option}.yaml")
            if group == "task":  # `# @package _global_`: the task's target beside its own settings node
                node = node.task
            while "_target_" not in node and node.get("defaults"):  # a variant of another option of the group
                base = node.defaults[0]
                assert base in group_options(group), f"{group}/{option}.yaml builds on {base!r}, not an option"
                node = OmegaConf.load(CONF_DIR / group / f"{base}.yaml")
            assert "_target_" in node, f"{group}/{option}.yaml has no _target_"


def test_improved_ddpm_cifar10_is_the_papers_recipe():
    cfg = compose_config("experiment=improved_ddpm_cifar10")
    assert cfg.schedule._target_.endswith("cosine_betas") and cfg.schedule.num_timesteps == 4000
    assert cfg.model.learn_sigma and cfg.diffusion.variance == "learned_range" and cfg.diffusion.vlb_weight == 0.001
    assert (cfg.model.num_res_blocks, cfg.model.dropout, cfg.optimizer.lr, cfg.trainer.batch_size) == (
        3,
        0.3,
        1e-4,
        128,
    )
    assert cfg.sampler._target_.endswith("ddpm_ancestral") and cfg.sampler.steps == 100
