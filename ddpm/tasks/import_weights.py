"""task=import: a diffusers `UNet2DModel` directory (config.json and diffusion_pytorch_model.safetensors or .bin, as
google/ddpm-cifar10-32 publishes the DDPM paper's CIFAR-10 model) as a checkpoint of this project, which
task=sample and task=evaluate read like any other.

    python main.py task=import import.source=ddpm-cifar10-32
    python main.py task=evaluate checkpoint=outputs/runs/.../checkpoints/imported.pt eval.num_samples=50000 sampler=ddpm

The checkpoint's config is the one this command composes (dataset, trainer, ...), with the model options that
compute what config.json describes (ddpm.model.unet.UNet's convention options: GroupNorm epsilon, TensorFlow's
padding, where the up path attends, ...) and the schedule of scheduler_config.json. Its weights and EMA weights
are the imported ones, at step 0. Whatever this UNet cannot express is refused with one line naming it.
"""

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, ClassVar

from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate, to_absolute_path
from omegaconf import DictConfig, OmegaConf

from ddpm.config.errors import ConfigError
from ddpm.config.validation import Validated, build_settings
from ddpm.diffusion.build import build_diffusion
from ddpm.io.checkpoint import save_checkpoint
from ddpm.io.diffusers_config import PAPER_SCHEDULE, model_options, schedule_from
from ddpm.io.diffusers_weights import WeightMapping, module_pairs, read_weights

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ImportSettings(Validated):
    """The `import` node of conf/task/import.yaml."""

    SECTION: ClassVar[str] = "import"

    source: str | None = None
    out: str | None = None


def check_settings(cfg: DictConfig) -> ImportSettings:
    settings: ImportSettings = build_settings(cfg["import"])
    if not settings.source:
        raise ConfigError(
            "task=import needs import.source=DIR, a diffusers UNet2DModel directory (config.json and "
            "diffusion_pytorch_model.safetensors or .bin, e.g. google/ddpm-cifar10-32)"
        )
    return settings


def model_directory(source: Path) -> Path:
    """The directory holding the UNet's config.json: `source`, or its unet/ (a whole pipeline's directory)."""
    if not source.is_dir():
        what = "does not exist" if not source.exists() else "is a file, not a directory"
        raise ConfigError(f"import.source={source} {what}: name the directory that holds config.json and the weights")
    for directory in (source, source / "unet"):
        if (directory / "config.json").is_file():
            return directory
    raise ConfigError(
        f"import.source={source} holds no config.json (nor unet/config.json): it is not a diffusers "
        f"model directory (it holds {sorted(p.name for p in source.iterdir())[:8]})"
    )


def read_json(path: Path) -> dict[str, Any]:
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"import.source: {path} is not a readable JSON file ({error})") from error
    if not isinstance(content, dict):
        raise ConfigError(f"import.source: {path} holds a JSON {type(content).__name__}, not an object of settings")
    return content


def find_scheduler_config(model_dir: Path) -> Path | None:
    """scheduler_config.json beside config.json or in the directory above (a pipeline's), or in a scheduler/
    directory in either."""
    for directory in (model_dir, model_dir.parent):
        for candidate in (directory / "scheduler_config.json", directory / "scheduler" / "scheduler_config.json"):
            if candidate.is_file():
                return candidate
    return None


def named_on_command_line(section: str) -> bool:
    overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
    return any(o.lstrip("+~").split("=")[0].split(".")[0].split("@")[0] == section for o in overrides)


def schedule_node(cfg: DictConfig, model_dir: Path) -> dict[str, Any]:
    """scheduler_config.json's schedule; without one, a schedule named on the command line, else the DDPM paper's."""
    path = find_scheduler_config(model_dir)
    if path is not None:
        if named_on_command_line("schedule"):
            raise ConfigError(
                f"a schedule was given on the command line, but {path} holds the one the model was "
                "trained with, which the import takes: drop the schedule override"
            )
        log.info("noise schedule from %s", path)
        node = schedule_from(read_json(path), path)
        try:  # betas the diffusion cannot use (a beta of 1 or more, say) are the scheduler config's fault
            instantiate(node)
        except Exception as error:  # Hydra's instantiate wraps the schedule's ConfigError
            cause = next((e for e in _causes(error) if isinstance(e, ConfigError)), None)
            if cause is None:
                raise
            raise ConfigError(f"{path} describes a noise schedule this project cannot use: {cause}") from error
        return node
    if named_on_command_line("schedule"):
        return OmegaConf.to_container(cfg.schedule, resolve=True)
    log.warning(
        "no scheduler_config.json beside or above %s: taking the DDPM paper's schedule (linear betas "
        "1e-4..0.02, 1000 steps); name another on the command line (e.g. schedule=cosine) if the model was "
        "trained with another",
        model_dir,
    )
    return dict(PAPER_SCHEDULE)


def checkpoint_config(cfg: DictConfig, model: dict[str, Any], schedule: dict[str, Any]) -> dict[str, Any]:
    """The config of a training run of this model: the composed one, with the imported model and schedule."""
    config = OmegaConf.to_container(cfg, resolve=True)
    del config["import"]
    config["task"] = {"_target_": "ddpm.tasks.train.run"}
    config["model"] = {**config["model"], **model}
    config["schedule"] = schedule
    if config["trainer"]["use_labels"]:
        raise ConfigError(
            "trainer.use_labels=true, but a UNet2DModel without class embeddings is unconditional: drop the override"
        )
    dataset = config["dataset"]
    for key, data_key in (("in_channels", "channels"), ("image_size", "image_size")):
        if model[key] != dataset[data_key]:
            raise ConfigError(
                f"the imported model has {key}={model[key]}, but dataset.{data_key}={dataset[data_key]}: name the "
                "dataset it was trained on (e.g. dataset=folder dataset.path=DIR "
                f"dataset.image_size={model['image_size']})"
            )
    return config


def _causes(error: BaseException | None):
    while error is not None:
        yield error
        error = error.__cause__


def run(cfg: DictConfig) -> dict:
    """config.json -> model options; scheduler_config.json -> schedule; the checkpoint's config -> diffusion ->
    diffusers' weights mapped onto it (and its EMA copy) -> the checkpoint, written atomically with its digest."""
    settings = check_settings(cfg)
    model_dir = model_directory(Path(to_absolute_path(settings.source)))
    config_path = model_dir / "config.json"
    source_config = read_json(config_path)
    model = model_options(source_config, config_path)
    config = checkpoint_config(cfg, model, schedule_node(cfg, model_dir))
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    out = Path(to_absolute_path(settings.out)) if settings.out else run_dir / "checkpoints" / "imported.pt"
    if out.exists():
        raise ConfigError(f"import.out={out} exists already: remove it or name another file")
    try:
        diffusion = build_diffusion(OmegaConf.create(config))
    except Exception as error:  # Hydra's instantiate wraps the UNet's ConfigError
        cause = next((e for e in _causes(error) if isinstance(e, ConfigError)), None)
        if cause is None:
            raise
        raise ConfigError(f"{config_path} describes a UNet this project cannot build: {cause}") from error

    weights_path, source_state = read_weights(model_dir)
    levels = len(model["channel_mults"])
    pairs = module_pairs(
        levels, model["num_res_blocks"], model["attention_resolutions"], model["up_attention_resolutions"]
    )
    state_dict = WeightMapping(source_state, weights_path).state_dict(diffusion.model, pairs)
    diffusion.model.load_state_dict(state_dict)
    if diffusion.ema is not None:
        diffusion.ema.module.load_state_dict(state_dict)
    provenance = {"source": str(model_dir), "weights": weights_path.name, "config": source_config}
    save_checkpoint(
        out,
        {
            "model": diffusion.model.state_dict(),
            "ema": diffusion.ema.state_dict() if diffusion.ema is not None else None,
            "step": 0,
            "config": config,
            "imported_from": provenance,
        },
    )
    parameters = sum(p.numel() for p in diffusion.model.parameters())
    log.info(
        "imported %s (%s parameters, %d tensors) into checkpoint %s",
        weights_path,
        f"{parameters:,}",
        len(source_state),
        out,
    )
    log.info("sample or evaluate it with: python main.py task=evaluate checkpoint=%s", out)
    return {"checkpoint": str(out), "parameters": parameters, "model": model, "schedule": config["schedule"]}
