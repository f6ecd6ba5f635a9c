"""The checks of the UNet's options: an impossible architecture is refused with the model.* key, its value and
what is allowed, before any layer is built."""

import math

from ddpm.config.errors import ConfigError
from ddpm.model.blocks import ACTIVATIONS, DOWNSAMPLE_PADDINGS, NORMS, TIME_EMBEDDING_ORDERS


def check_architecture(
    in_channels,
    image_size,
    base_channels,
    channel_mults,
    num_res_blocks,
    time_emb_dim,
    attention_resolutions,
    norm,
    num_groups,
    dropout,
    activation,
    use_labels,
    num_classes,
) -> None:
    """Rejects an impossible architecture with a message naming the model.* key, before any layer is built."""
    if in_channels < 1:
        raise ConfigError(f"model.in_channels={in_channels} must be >= 1")
    if base_channels < 1 or base_channels % 2:
        raise ConfigError(f"model.base_channels={base_channels} must be a positive even number")
    if not channel_mults or any(m < 1 for m in channel_mults):
        raise ConfigError(f"model.channel_mults={channel_mults} must be a non-empty list of integers >= 1")
    if num_res_blocks < 1:
        raise ConfigError(f"model.num_res_blocks={num_res_blocks} must be >= 1")
    if time_emb_dim < 1:
        raise ConfigError(f"model.time_emb_dim={time_emb_dim} must be >= 1 (or null for 4 * base_channels)")
    factor = 2 ** (len(channel_mults) - 1)
    if image_size < factor or image_size % factor:
        raise ConfigError(
            f"model.image_size={image_size} must be a multiple of 2**(len(model.channel_mults)-1)={factor} "
            f"(channel_mults={channel_mults} halves the resolution {len(channel_mults) - 1} times)"
        )
    for index in attention_resolutions:
        if not 0 <= index < len(channel_mults):
            raise ConfigError(
                f"model.attention_resolutions contains {index}, which is out of range: it holds indices "
                f"into model.channel_mults={channel_mults}, so 0..{len(channel_mults) - 1} are allowed"
            )
    if norm not in NORMS:
        raise ConfigError(f"model.norm={norm!r} is not one of {list(NORMS)}")
    if norm == "gn":
        widths = sorted({base_channels * m for m in channel_mults} | {base_channels})
        if num_groups < 1 or any(w % num_groups for w in widths):  # (< 1 first: no division by 0)
            raise ConfigError(
                f"model.num_groups={num_groups} must divide the channel count of every level; "
                f"model.base_channels={base_channels} x channel_mults={channel_mults} gives {widths}"
            )
    if not 0 <= dropout < 1:
        raise ConfigError(f"model.dropout={dropout} must be in [0, 1)")
    if activation not in ACTIVATIONS:
        raise ConfigError(f"model.activation={activation!r} is not one of {list(ACTIVATIONS)}")
    if use_labels and (num_classes is None or num_classes < 1):
        raise ConfigError(f"trainer.use_labels=true needs class labels, but the dataset has num_classes={num_classes}")


def check_conventions(
    base_channels,
    channel_mults,
    attention_resolutions,
    up_attention_resolutions,
    norm_eps,
    downsample_padding,
    attention_head_dim,
    time_embedding_order,
    time_embedding_freq_shift,
) -> None:
    """The checks of the options that adopt another implementation's conventions, naming the model.* key."""
    if not (math.isfinite(norm_eps) and norm_eps > 0):
        raise ConfigError(f"model.norm_eps={norm_eps} must be a finite number > 0")
    if downsample_padding not in DOWNSAMPLE_PADDINGS:
        raise ConfigError(f"model.downsample_padding={downsample_padding!r} is not one of {list(DOWNSAMPLE_PADDINGS)}")
    for index in up_attention_resolutions:
        if not 0 <= index < len(channel_mults):
            raise ConfigError(
                f"model.up_attention_resolutions contains {index}, which is out of range: it holds indices into "
                f"model.channel_mults={channel_mults}, so 0..{len(channel_mults) - 1} are allowed (or null)"
            )
    if attention_head_dim is not None:
        attended = {*attention_resolutions, *up_attention_resolutions, len(channel_mults) - 1}  # the middle attends
        widths = sorted({base_channels * channel_mults[i] for i in attended})
        if attention_head_dim < 1 or any(w % attention_head_dim for w in widths):
            raise ConfigError(
                f"model.attention_head_dim={attention_head_dim} must divide the channel count of every level with "
                f"attention, {widths} (or null for one head)"
            )
    if time_embedding_order not in TIME_EMBEDDING_ORDERS:
        raise ConfigError(
            f"model.time_embedding_order={time_embedding_order!r} is not one of {list(TIME_EMBEDDING_ORDERS)}"
        )
    half = base_channels // 2
    if not (math.isfinite(time_embedding_freq_shift) and time_embedding_freq_shift < half):
        raise ConfigError(
            f"model.time_embedding_freq_shift={time_embedding_freq_shift} must be a finite number below "
            f"model.base_channels/2={half} (the frequencies divide by their difference)"
        )
