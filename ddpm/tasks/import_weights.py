"""task=import: a diffusers `UNet2DModel` directory (config.json and diffusion_pytorch_model.safetensors or .bin, as
google/ddpm-cifar10-32 publishes the DDPM paper's CIFAR-10 model) as a checkpoint of this project, which
task=sample and task=evaluate read like any other.

    python main.py task=import import.source=ddpm-cifar10-32
    python main.py task=evaluate checkpoint=outputs/runs/.../checkpoints/imported.pt eval.num_samples=50000 sampler=ddpm

The checkpoint's config is the one this command composes (dataset, trainer, ...), with the model options that
compute what config.json describes (ddpm.unet.UNet's convention options: GroupNorm epsilon, TensorFlow's
padding, where the up path attends, ...) and the schedule of scheduler_config.json. Its weights and EMA weights
are the imported ones, at step 0. Whatever this UNet cannot express is refused with one line naming it.
"""

import dataclasses
import json
import logging
import pickle
from pathlib import Path
from typing import Any, ClassVar

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

from ddpm.build import build_diffusion
from ddpm.checkpoint import save_checkpoint
from ddpm.errors import ConfigError
from ddpm.unet import UNet
from ddpm.validation import Validated, build_settings

log = logging.getLogger(__name__)

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")

# diffusers' UNet2DModel defaults: what diffusers builds for a key that config.json leaves out.
UNET2D_DEFAULTS: dict[str, Any] = {
    "sample_size": None, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 0, "flip_sin_to_cos": True,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [224, 448, 672, 896], "layers_per_block": 2, "mid_block_scale_factor": 1,
    "downsample_padding": 1, "downsample_type": "conv", "upsample_type": "conv", "dropout": 0.0, "act_fn": "silu",
    "attention_head_dim": 8, "norm_num_groups": 32, "attn_norm_num_groups": None, "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None, "num_class_embeds": None,
    "num_train_timesteps": None,
}  # fmt: skip
# The same for the noise schedule of a diffusers scheduler (DDPMScheduler, DDIMScheduler, ... share these keys).
SCHEDULER_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "trained_betas": None, "prediction_type": "epsilon", "rescale_betas_zero_snr": False,
}  # fmt: skip
# The DDPM paper's schedule (Ho et al. 2020, Sec. 4), for a model directory without a scheduler_config.json.
PAPER_SCHEDULE = {"_target_": "ddpm.schedules.linear_betas", "num_timesteps": 1000, "low": 1.0e-4, "high": 0.02}

# Our residual block's parameters by diffusers' ResnetBlock2D names.
RESNET_NAMES = {"norm_1": "norm1", "conv_1": "conv1", "time_bias": "time_emb_proj", "norm_2": "norm2",
                "conv_2": "conv2", "skip": "conv_shortcut"}  # fmt: skip
# diffusers' attention projections: the current names, then those of the checkpoints published before diffusers
# 0.14 (the google/ddpm-* ones), which diffusers itself still renames on load.
ATTENTION_NAMES = {"q": ("to_q", "query"), "k": ("to_k", "key"), "v": ("to_v", "value"), "out": ("to_out.0", "proj_attn")}


@dataclasses.dataclass
class ImportSettings(Validated):
    """The `import` node of conf/task/import.yaml."""

    SECTION: ClassVar[str] = "import"

    source: str | None = None
    out: str | None = None


def check_settings(cfg: DictConfig) -> ImportSettings:
    settings: ImportSettings = build_settings(cfg["import"])
    if not settings.source:
        raise ConfigError("task=import needs import.source=DIR, a diffusers UNet2DModel directory (config.json and "
                          "diffusion_pytorch_model.safetensors or .bin, e.g. google/ddpm-cifar10-32)")  # fmt: skip
    return settings


def model_directory(source: Path) -> Path:
    """The directory holding the UNet's config.json: `source`, or its unet/ (a whole pipeline's directory)."""
    if not source.is_dir():
        what = "does not exist" if not source.exists() else "is a file, not a directory"
        raise ConfigError(f"import.source={source} {what}: name the directory that holds config.json and the weights")
    for directory in (source, source / "unet"):
        if (directory / "config.json").is_file():
            return directory
    raise ConfigError(f"import.source={source} holds no config.json (nor unet/config.json): it is not a diffusers "
                      f"model directory (it holds {sorted(p.name for p in source.iterdir())[:8]})")  # fmt: skip


def read_json(path: Path) -> dict[str, Any]:
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"import.source: {path} is not a readable JSON file ({error})") from error
    if not isinstance(content, dict):
        raise ConfigError(f"import.source: {path} holds a JSON {type(content).__name__}, not an object of settings")
    return content


CLASS_EMBEDDINGS = ("diffusers adds class embeddings to the time embedding, which this UNet's class conditioning (a "
                    "bias per block) cannot express")


def model_options(config: dict[str, Any], path: Path) -> dict[str, Any]:
    """The model.* options of the UNet that computes what config.json (at `path`) describes, or a ConfigError
    naming the first setting this UNet cannot express."""
    class_name = config.get("_class_name", "UNet2DModel")
    if class_name != "UNet2DModel":
        raise ConfigError(f"{path}: _class_name={class_name!r}; only a diffusers UNet2DModel can be imported")
    ignored = sorted(k for k in config if not k.startswith("_") and k not in UNET2D_DEFAULTS)
    if ignored:  # diffusers ignores them as well (with a warning)
        log.warning("%s: ignoring settings that UNet2DModel does not take: %s", path, ", ".join(ignored))
    c = {**UNET2D_DEFAULTS, **config}

    def refuse(key: str, allowed: str) -> ConfigError:
        return ConfigError(f"{path}: {key}={c[key]!r} cannot be imported: {allowed}")

    supported = {
        "time_embedding_type": ("positional", "only sinusoidal timestep features ('positional') are supported"),
        "resnet_time_scale_shift": ("default", "only 'default' (the time embedding added as a bias) is supported"),
        "center_input_sample": (False, "only false is supported"),
        "mid_block_type": ("UNetMidBlock2D", "only 'UNetMidBlock2D' is supported"),
        "add_attention": (True, "the middle block always attends here"),
        "downsample_type": ("conv", "only 'conv' (a strided convolution) is supported"),
        "upsample_type": ("conv", "only 'conv' (nearest-neighbour upsampling and a convolution) is supported"),
        "class_embed_type": (None, CLASS_EMBEDDINGS),
        "num_class_embeds": (None, CLASS_EMBEDDINGS),
    }
    for key, (value, allowed) in supported.items():
        if c[key] != value or type(c[key]) is not type(value):
            raise refuse(key, allowed)
    if c["act_fn"] not in ("silu", "swish"):  # diffusers uses SiLU in the time embedding and output whatever act_fn
        raise refuse("act_fn", "only 'silu' (also called 'swish') is supported")
    if c["mid_block_scale_factor"] != 1:
        raise refuse("mid_block_scale_factor", "only 1 (no rescaling of the middle block's outputs) is supported")
    if not _is_int(c["downsample_padding"]) or c["downsample_padding"] not in (0, 1):
        raise refuse("downsample_padding", "only 1 (symmetric) and 0 (bottom and right only, as TensorFlow) are supported")
    groups = c["norm_num_groups"]
    if not _is_int(groups) or groups < 1:
        raise refuse("norm_num_groups", "a number of groups is needed")
    if c["attn_norm_num_groups"] not in (None, groups):
        raise refuse("attn_norm_num_groups", f"attention normalizes with norm_num_groups={groups} groups here")
    for key in ("in_channels", "out_channels", "layers_per_block"):
        if not _is_int(c[key]) or c[key] < 1:
            raise refuse(key, "a positive integer is needed")
    if c["out_channels"] != c["in_channels"]:
        raise refuse("out_channels", f"the network predicts the noise of each of its in_channels={c['in_channels']} "
                                     "channels here")  # fmt: skip
    for key in ("freq_shift", "norm_eps", "dropout"):
        if not (_is_int(c[key]) or isinstance(c[key], float)):
            raise refuse(key, "a number is needed")
    if not isinstance(c["flip_sin_to_cos"], bool):
        raise refuse("flip_sin_to_cos", "true or false")
    for key in ("attention_head_dim", "time_embedding_dim"):  # one number for every level, or null
        if c[key] is not None and not _is_int(c[key]):
            raise refuse(key, "an integer or null is needed")

    size = c["sample_size"]
    if isinstance(size, list) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    if not _is_int(size) or size < 1:
        raise refuse("sample_size", "square images of one integer size are needed (the size the model was trained at)")

    widths = c["block_out_channels"]
    if not isinstance(widths, list) or not widths or not all(_is_int(w) and w >= 1 for w in widths):
        raise refuse("block_out_channels", "a list of positive integers is needed")
    base = widths[0]
    if any(w % base for w in widths):
        raise refuse("block_out_channels", f"every width must be a multiple of the first, {base}")
    levels = len(widths)
    down = [_block_kind(t) for t in c["down_block_types"]] if isinstance(c["down_block_types"], list) else None
    up = [_block_kind(t) for t in c["up_block_types"]] if isinstance(c["up_block_types"], list) else None
    for key, kinds, names in (("down_block_types", down, ("DownBlock2D", "AttnDownBlock2D")),
                              ("up_block_types", up, ("UpBlock2D", "AttnUpBlock2D"))):  # fmt: skip
        if kinds is None or len(kinds) != levels or any(kind not in names for kind in kinds):
            raise refuse(key, f"{levels} blocks (one per width of block_out_channels), each one of {list(names)}")

    return {
        "in_channels": c["in_channels"],
        "out_channels": c["out_channels"],
        "image_size": size,
        "base_channels": base,
        "channel_mults": [w // base for w in widths],
        "num_res_blocks": c["layers_per_block"],
        "time_emb_dim": c["time_embedding_dim"],
        "attention_resolutions": [i for i, kind in enumerate(down) if kind.startswith("Attn")],
        "norm": "gn",
        "num_groups": groups,
        "dropout": float(c["dropout"]),
        "activation": "silu",
        "use_labels": False,
        "norm_eps": float(c["norm_eps"]),
        "downsample_padding": "tf_same" if c["downsample_padding"] == 0 else "symmetric",
        # diffusers' up blocks run from the lowest resolution up: up block i is level (levels - 1 - i).
        "up_attention_resolutions": sorted(levels - 1 - i for i, kind in enumerate(up) if kind.startswith("Attn")),
        "attention_head_dim": c["attention_head_dim"],
        "time_embedding_order": "cos_sin" if c["flip_sin_to_cos"] else "sin_cos",
        "time_embedding_freq_shift": c["freq_shift"],
    }


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON's true is not a count


def _block_kind(name: Any) -> Any:
    """A block type as diffusers reads it: a "UNetRes" prefix is dropped."""
    return name[len("UNetRes"):] if isinstance(name, str) and name.startswith("UNetRes") else name


def find_scheduler_config(model_dir: Path) -> Path | None:
    """scheduler_config.json beside config.json or in the directory above (a pipeline's), or in a scheduler/
    directory in either."""
    for directory in (model_dir, model_dir.parent):
        for candidate in (directory / "scheduler_config.json", directory / "scheduler" / "scheduler_config.json"):
            if candidate.is_file():
                return candidate
    return None


def schedule_from(scheduler: dict[str, Any], path: Path) -> dict[str, Any]:
    """The schedule node with the betas of a diffusers scheduler config, or a ConfigError naming what differs."""
    s = {**SCHEDULER_DEFAULTS, **scheduler}

    def refuse(key: str, allowed: str) -> ConfigError:
        return ConfigError(f"{path}: {key}={s[key]!r} cannot be imported: {allowed}")

    if s["prediction_type"] != "epsilon":
        raise refuse("prediction_type", "only 'epsilon' is imported (diffusion.prediction=eps)")
    if s["trained_betas"] is not None:
        raise refuse("trained_betas", "only the 'linear' and 'squaredcos_cap_v2' beta schedules are supported")
    if s["rescale_betas_zero_snr"] is not False:
        raise refuse("rescale_betas_zero_snr", "only false is supported")
    steps = s["num_train_timesteps"]
    if not _is_int(steps) or steps < 1:
        raise refuse("num_train_timesteps", "a positive integer is needed")
    if s["beta_schedule"] == "squaredcos_cap_v2":  # Nichol & Dhariwal's cosine, betas clipped at 0.999, as ours
        return {"_target_": "ddpm.schedules.cosine_betas", "num_timesteps": steps, "s": 0.008, "max_beta": 0.999}
    if s["beta_schedule"] != "linear":
        raise refuse("beta_schedule", "only 'linear' and 'squaredcos_cap_v2' are supported")
    for key in ("beta_start", "beta_end"):
        if not (_is_int(s[key]) or isinstance(s[key], float)):
            raise refuse(key, "a number is needed")
    # schedule.low/high are given for T = 1000 and rescaled by 1000 / T: diffusers' betas are the rescaled ones.
    scale = 1 if steps == 1000 else steps / 1000
    return {"_target_": "ddpm.schedules.linear_betas", "num_timesteps": steps,
            "low": float(s["beta_start"]) * scale, "high": float(s["beta_end"]) * scale}  # fmt: skip


def named_on_command_line(section: str) -> bool:
    overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
    return any(o.lstrip("+~").split("=")[0].split(".")[0].split("@")[0] == section for o in overrides)


def schedule_node(cfg: DictConfig, model_dir: Path) -> dict[str, Any]:
    """scheduler_config.json's schedule; without one, a schedule named on the command line, else the DDPM paper's."""
    path = find_scheduler_config(model_dir)
    if path is not None:
        if named_on_command_line("schedule"):
            raise ConfigError(f"a schedule was given on the command line, but {path} holds the one the model was "
                              "trained with, which the import takes: drop the schedule override")  # fmt: skip
        log.info("noise schedule from %s", path)
        return schedule_from(read_json(path), path)
    if named_on_command_line("schedule"):
        return OmegaConf.to_container(cfg.schedule, resolve=True)
    log.warning("no scheduler_config.json beside or above %s: taking the DDPM paper's schedule (linear betas "
                "1e-4..0.02, 1000 steps); name another on the command line (e.g. schedule=cosine) if the model was "
                "trained with another", model_dir)  # fmt: skip
    return dict(PAPER_SCHEDULE)


def checkpoint_config(cfg: DictConfig, model: dict[str, Any], schedule: dict[str, Any]) -> dict[str, Any]:
    """The config of a training run of this model: the composed one, with the imported model and schedule."""
    config = OmegaConf.to_container(cfg, resolve=True)
    del config["import"]
    config["task"] = {"_target_": "ddpm.tasks.train.run"}
    config["model"] = {**config["model"], **model}
    config["schedule"] = schedule
    if config["trainer"]["use_labels"]:
        raise ConfigError("trainer.use_labels=true, but a UNet2DModel without class embeddings is unconditional: "
                          "drop the override")  # fmt: skip
    dataset = config["dataset"]
    for key, data_key in (("in_channels", "channels"), ("image_size", "image_size")):
        if model[key] != dataset[data_key]:
            raise ConfigError(
                f"the imported model has {key}={model[key]}, but dataset.{data_key}={dataset[data_key]}: name the "
                "dataset it was trained on (e.g. dataset=folder dataset.path=DIR "
                f"dataset.image_size={model['image_size']})"
            )
    return config


def read_weights(model_dir: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """The state dict in diffusion_pytorch_model.safetensors (read with the safetensors package) or .bin (with
    torch.load(weights_only=True): no code in the file runs)."""
    found = [model_dir / name for name in WEIGHT_FILES if (model_dir / name).is_file()]
    if not found:
        raise ConfigError(f"import.source: {model_dir} holds config.json but no {' or '.join(WEIGHT_FILES)} "
                          f"(it holds {sorted(p.name for p in model_dir.iterdir())[:8]})")  # fmt: skip
    path = found[0]
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as error:
            if len(found) > 1:
                path = found[1]
            else:
                raise ConfigError(f"import.source: {path} needs the safetensors package to be read: pip install "
                                  "safetensors") from error  # fmt: skip
    try:
        if path.suffix == ".safetensors":
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ConfigError(f"import.source: {path} holds objects other than tensors, which are not loaded (loading "
                          "them could run code from the file)") from error  # fmt: skip
    except Exception as error:
        reason = next(iter(str(error).splitlines()), "") or type(error).__name__
        raise ConfigError(f"import.source: {path} is not a readable weights file (truncated or damaged?): {reason}") from error
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ConfigError(f"import.source: {path} does not hold a state dict (names and tensors)")
    return path, state


def module_pairs(levels: int, layers: int, down_attention: list[int], up_attention: list[int]) -> list[tuple[str, str, str]]:
    """(our module, diffusers' module, kind) for every module with weights; kind is "resnet", "attention" or
    "plain" (weight and bias under the same names)."""
    pairs = [("time_mlp.0", "time_embedding.linear_1", "plain"), ("time_mlp.2", "time_embedding.linear_2", "plain"),
             ("init_conv", "conv_in", "plain")]  # fmt: skip
    for level in range(levels):
        for j in range(layers):
            pairs.append((f"down.{level}.blocks.{j}", f"down_blocks.{level}.resnets.{j}", "resnet"))
            if level in down_attention:
                pairs.append((f"down.{level}.blocks.{j}.attention", f"down_blocks.{level}.attentions.{j}", "attention"))
        if level < levels - 1:
            pairs.append((f"down.{level}.resample.conv", f"down_blocks.{level}.downsamplers.0.conv", "plain"))
    pairs += [("middle.0", "mid_block.resnets.0", "resnet"), ("middle.0.attention", "mid_block.attentions.0", "attention"),
              ("middle.1", "mid_block.resnets.1", "resnet")]  # fmt: skip
    for i in range(levels):  # both up paths run from the lowest resolution up
        for j in range(layers + 1):
            pairs.append((f"up.{i}.blocks.{j}", f"up_blocks.{i}.resnets.{j}", "resnet"))
            if levels - 1 - i in up_attention:
                pairs.append((f"up.{i}.blocks.{j}.attention", f"up_blocks.{i}.attentions.{j}", "attention"))
        if i < levels - 1:
            pairs.append((f"up.{i}.resample.conv", f"up_blocks.{i}.upsamplers.0.conv", "plain"))
    pairs += [("out_norm", "conv_norm_out", "plain"), ("out_conv", "conv_out", "plain")]
    return pairs


class WeightMapping:
    """Our state dict from diffusers' one: every tensor of ours from exactly the tensors it corresponds to, every
    one of theirs used once, every shape checked; the errors name diffusers' tensor and what was expected."""

    def __init__(self, source: dict[str, torch.Tensor], path: Path):
        self.source, self.path, self.used = source, path, set()

    def take(self, name: str, shape: tuple[int, ...], ours: str) -> torch.Tensor:
        """Their tensor `name`, which must have `shape`; `ours` names the tensor it becomes, for the messages."""
        if name not in self.source:
            raise ConfigError(f"import.source: {self.path} has no tensor {name}, which the architecture of config.json "
                              f"has ({ours} here): the weights are not those of that config")  # fmt: skip
        tensor = self.source[name]
        if tuple(tensor.shape) != shape or not tensor.is_floating_point():
            raise ConfigError(f"import.source: {self.path}: {name} is a {tensor.dtype} tensor of shape "
                              f"{list(tensor.shape)}, but the architecture of config.json needs a floating-point one "
                              f"of shape {list(shape)} ({ours} here)")  # fmt: skip
        self.used.add(name)
        return tensor

    def spelled(self, module: str, names: tuple[str, ...], parameter: str) -> str:
        """An attention projection's name as this file spells it (the current spelling when none is present)."""
        candidates = [f"{module}.{name}.{parameter}" for name in names]
        return next((c for c in candidates if c in self.source), candidates[0])

    def convert(self, ours: str, relative: str, theirs: str, kind: str, target: torch.Tensor) -> torch.Tensor:
        """Our tensor `ours` (`relative` to its module), of `target`'s shape, from diffusers' module `theirs`
        (`kind`: see module_pairs)."""
        module, _, parameter = relative.rpartition(".")
        shape = tuple(target.shape)
        if kind == "plain":
            return self.take(f"{theirs}.{parameter}", shape, ours)
        if kind == "resnet":
            return self.take(f"{theirs}.{RESNET_NAMES[module]}.{parameter}", shape, ours)
        # Attention: our norm is their group_norm; our 1x1 convolutions to_qkv (q, k and v stacked) and to_out are
        # their linear layers.
        if module == "norm":
            return self.take(f"{theirs}.group_norm.{parameter}", shape, ours)
        parts = ("q", "k", "v") if module == "to_qkv" else ("out",)
        channels = target.shape[0] // len(parts)
        part_shape = (channels, channels) if parameter == "weight" else (channels,)
        tensors = [self.take(self.spelled(theirs, ATTENTION_NAMES[p], parameter), part_shape, ours) for p in parts]
        return torch.cat(tensors).reshape(shape)

    def state_dict(self, model: UNet, pairs: list[tuple[str, str, str]]) -> dict[str, torch.Tensor]:
        """Every tensor of `model`'s state dict, converted; their tensors left over are an error."""
        by_length = sorted(pairs, key=lambda pair: -len(pair[0]))  # "blocks.0.attention" before "blocks.0"
        converted = {}
        for name, target in model.state_dict().items():
            module, theirs, kind = next(p for p in by_length if name.startswith(p[0] + "."))
            tensor = self.convert(name, name[len(module) + 1 :], theirs, kind, target)
            converted[name] = tensor.to(target.dtype).contiguous()
        unused = sorted(set(self.source) - self.used)
        if unused:
            raise ConfigError(f"import.source: {self.path} holds {len(unused)} tensor(s) that the architecture of "
                              f"config.json has no place for: {', '.join(unused[:4])}{' ...' if len(unused) > 4 else ''}")  # fmt: skip
        return converted


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
    pairs = module_pairs(levels, model["num_res_blocks"], model["attention_resolutions"], model["up_attention_resolutions"])
    state_dict = WeightMapping(source_state, weights_path).state_dict(diffusion.model, pairs)
    diffusion.model.load_state_dict(state_dict)
    if diffusion.ema is not None:
        diffusion.ema.module.load_state_dict(state_dict)
    provenance = {"source": str(model_dir), "weights": weights_path.name, "config": source_config}
    save_checkpoint(out, {
        "model": diffusion.model.state_dict(),
        "ema": diffusion.ema.state_dict() if diffusion.ema is not None else None,
        "step": 0,
        "config": config,
        "imported_from": provenance,
    })  # fmt: skip
    parameters = sum(p.numel() for p in diffusion.model.parameters())
    log.info("imported %s (%s parameters, %d tensors) into checkpoint %s", weights_path, f"{parameters:,}",
             len(source_state), out)  # fmt: skip
    log.info("sample or evaluate it with: python main.py task=evaluate checkpoint=%s", out)
    return {"checkpoint": str(out), "parameters": parameters, "model": model, "schedule": config["schedule"]}
