"""diffusers' configs read as this project's: a `UNet2DModel` config.json as the model.* options of the UNet
that computes the same function (its convention options: GroupNorm epsilon, TensorFlow's padding, where the up
path attends, ...), and a scheduler_config.json as the schedule node with the same betas. Whatever this UNet or
its schedules cannot express is refused with one line naming the setting."""

import logging
from pathlib import Path
from typing import Any

from ddpm.config.errors import ConfigError

log = logging.getLogger(__name__)

# diffusers' UNet2DModel defaults: what diffusers builds for a key that config.json leaves out.
UNET2D_DEFAULTS: dict[str, Any] = {
    "sample_size": None,
    "in_channels": 3,
    "out_channels": 3,
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [224, 448, 672, 896],
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "downsample_padding": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "dropout": 0.0,
    "act_fn": "silu",
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "attn_norm_num_groups": None,
    "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
    "num_train_timesteps": None,
}
# The same for the noise schedule of a diffusers scheduler (DDPMScheduler, DDIMScheduler, ... share these keys).
SCHEDULER_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "rescale_betas_zero_snr": False,
}
# The DDPM paper's schedule (Ho et al. 2020, Sec. 4), for a model directory without a scheduler_config.json.
PAPER_SCHEDULE = {
    "_target_": "ddpm.diffusion.schedules.linear_betas",
    "num_timesteps": 1000,
    "low": 1.0e-4,
    "high": 0.02,
}

CLASS_EMBEDDINGS = (
    "diffusers adds class embeddings to the time embedding, which this UNet's class conditioning (a "
    "bias per block) cannot express"
)


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
        raise refuse(
            "downsample_padding", "only 1 (symmetric) and 0 (bottom and right only, as TensorFlow) are supported"
        )
    groups = c["norm_num_groups"]
    if not _is_int(groups) or groups < 1:
        raise refuse("norm_num_groups", "a number of groups is needed")
    if c["attn_norm_num_groups"] not in (None, groups):
        raise refuse("attn_norm_num_groups", f"attention normalizes with norm_num_groups={groups} groups here")
    for key in ("in_channels", "out_channels", "layers_per_block"):
        if not _is_int(c[key]) or c[key] < 1:
            raise refuse(key, "a positive integer is needed")
    if c["out_channels"] != c["in_channels"]:
        raise refuse(
            "out_channels",
            f"the network predicts the noise of each of its in_channels={c['in_channels']} channels here",
        )
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
    for key, kinds, names in (
        ("down_block_types", down, ("DownBlock2D", "AttnDownBlock2D")),
        ("up_block_types", up, ("UpBlock2D", "AttnUpBlock2D")),
    ):
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
    return name[len("UNetRes") :] if isinstance(name, str) and name.startswith("UNetRes") else name


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
        return {
            "_target_": "ddpm.diffusion.schedules.cosine_betas",
            "num_timesteps": steps,
            "s": 0.008,
            "max_beta": 0.999,
        }
    if s["beta_schedule"] != "linear":
        raise refuse("beta_schedule", "only 'linear' and 'squaredcos_cap_v2' are supported")
    for key in ("beta_start", "beta_end"):
        if not (_is_int(s[key]) or isinstance(s[key], float)):
            raise refuse(key, "a number is needed")
    # schedule.low/high are given for T = 1000 and rescaled by 1000 / T: diffusers' betas are the rescaled ones.
    scale = 1 if steps == 1000 else steps / 1000
    return {
        "_target_": "ddpm.diffusion.schedules.linear_betas",
        "num_timesteps": steps,
        "low": float(s["beta_start"]) * scale,
        "high": float(s["beta_end"]) * scale,
    }
