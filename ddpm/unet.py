"""The noise-prediction network: the DDPM UNet (Ho et al. 2020, Appendix B), optionally class-conditional.

It maps (x_t, t, y) to a tensor of x_t's shape and knows nothing about noise schedules.
At the CIFAR-10 defaults it has the paper's 35.7M parameters.
"""

import math
from collections.abc import Sequence

import torch
from torch import nn

from ddpm.checks import config_types
from ddpm.errors import ConfigError
from ddpm.unet_blocks import (
    ACTIVATIONS, DOWNSAMPLE_PADDINGS, NORMS, TIME_EMBEDDING_ORDERS, Downsample, Level, ResidualBlock, Upsample,
    make_norm, sinusoidal_embedding,
)  # fmt: skip


class UNet(nn.Module):
    """The DDPM UNet. `attention_resolutions` holds indices into `channel_mults` (1 = 16x16 for 32x32 input).

    The options after `subpixel_upsample` are conventions of other implementations of the same architecture, so
    that their trained weights compute here what they computed there (task=import); their defaults are this
    project's own."""

    @config_types("model")
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int | None = None,
        image_size: int = 32,
        base_channels: int = 128,
        channel_mults: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        time_emb_dim: int | None = None,
        attention_resolutions: Sequence[int] = (1,),
        norm: str | None = "gn",
        num_groups: int = 32,
        dropout: float = 0.01,
        activation: str = "silu",
        use_labels: bool = False,
        num_classes: int | None = None,
        null_class: bool = False,
        subpixel_upsample: bool = True,
        norm_eps: float = 1e-5,
        downsample_padding: str = "symmetric",
        up_attention_resolutions: Sequence[int] | None = None,
        attention_head_dim: int | None = None,
        time_embedding_order: str = "sin_cos",
        time_embedding_freq_shift: float = 1,
        learn_sigma: bool = False,
    ):
        """`null_class` adds one more label, `num_classes`, meaning "no class": classifier-free guidance trains it
        by dropping labels (trainer.label_dropout) and samples with it for the unconditional prediction.
        `subpixel_upsample` computes each upsampling's nearest-neighbour + 3x3 convolution at the low resolution
        (the same function and weights, fewer operations; see Upsample).

        `norm_eps`: the normalization layers' epsilon (the DDPM release used 1e-6). `downsample_padding`:
        "symmetric", or "tf_same" (bottom and right only, TensorFlow's; see Downsample). `up_attention_resolutions`:
        the levels of the up path that attend, when not those of the down path (None = attention_resolutions).
        `attention_head_dim`: channels per attention head (None = one head). `time_embedding_order` and
        `time_embedding_freq_shift`: the layout of the timestep features (see sinusoidal_embedding).
        `learn_sigma` doubles the output channels: the second half is the reverse process's variance
        (diffusion.variance=learned_range, Nichol & Dhariwal 2021)."""
        super().__init__()
        norm = norm or "none"
        channel_mults = list(channel_mults)
        attention_resolutions = list(attention_resolutions)
        up_attention_resolutions = (
            attention_resolutions if up_attention_resolutions is None else list(up_attention_resolutions)
        )
        out_channels = (out_channels or in_channels) * (2 if learn_sigma else 1)
        self.learn_sigma = learn_sigma
        time_emb_dim = time_emb_dim or 4 * base_channels
        _check_arguments(
            in_channels, image_size, base_channels, channel_mults, num_res_blocks, time_emb_dim,
            attention_resolutions, norm, num_groups, dropout, activation, use_labels, num_classes,
        )  # fmt: skip
        _check_conventions(
            base_channels, channel_mults, attention_resolutions, up_attention_resolutions, norm_eps,
            downsample_padding, attention_head_dim, time_embedding_order, time_embedding_freq_shift,
        )  # fmt: skip
        self.in_channels = in_channels
        self.image_size = image_size
        self.num_classes = num_classes if use_labels else None
        self.null_label = num_classes if use_labels and null_class else None
        self.time_embedding = {"freq_shift": time_embedding_freq_shift, "cos_first": time_embedding_order == "cos_sin"}
        block = dict(
            time_emb_dim=time_emb_dim,
            num_classes=None if self.num_classes is None else self.num_classes + (self.null_label is not None),
            dropout=dropout,
            norm=norm,
            num_groups=num_groups,
            activation=activation,
            norm_eps=norm_eps,
            attention_head_dim=attention_head_dim,
        )

        self.time_mlp = nn.Sequential(
            nn.Linear(base_channels, time_emb_dim),
            ACTIVATIONS[activation](),
            nn.Linear(time_emb_dim, time_emb_dim),
        )
        self.init_conv = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        # Every activation the down path produces is kept for a skip connection of the up path.
        skip_channels = [base_channels]
        channels = base_channels
        self.down = nn.ModuleList()
        for index, mult in enumerate(channel_mults):
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(
                    ResidualBlock(channels, base_channels * mult, attention=index in attention_resolutions, **block)
                )
                channels = base_channels * mult
                skip_channels.append(channels)
            is_last = index == len(channel_mults) - 1
            self.down.append(Level(blocks, None if is_last else Downsample(channels, downsample_padding)))
            if not is_last:
                skip_channels.append(channels)

        self.middle = nn.ModuleList(
            [
                ResidualBlock(channels, channels, attention=True, **block),
                ResidualBlock(channels, channels, attention=False, **block),
            ]
        )

        self.up = nn.ModuleList()
        for index, mult in reversed(list(enumerate(channel_mults))):
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(
                    ResidualBlock(
                        channels + skip_channels.pop(),
                        base_channels * mult,
                        attention=index in up_attention_resolutions,
                        **block,
                    )
                )
                channels = base_channels * mult
            self.up.append(Level(blocks, Upsample(channels, subpixel_upsample) if index > 0 else None))

        self.out_norm = make_norm(norm, channels, num_groups, norm_eps)
        self.out_activation = ACTIVATIONS[activation]()
        self.out_conv = nn.Conv2d(channels, out_channels, 3, padding=1)
        self.base_channels = base_channels

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Predicts the noise in x_t at integer timesteps t (shape [B]); y holds class labels when conditional."""
        if self.num_classes is not None and y is None:
            raise ValueError("this UNet is class-conditional (use_labels=true): pass labels y")
        if self.num_classes is None:
            y = None
        time_emb = self.time_mlp(sinusoidal_embedding(t, self.base_channels, x.dtype, **self.time_embedding))

        h = self.init_conv(x)
        skips = [h]
        for level in self.down:
            for block in level.blocks:
                h = block(h, time_emb, y)
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h)
                skips.append(h)

        for block in self.middle:
            h = block(h, time_emb, y)

        for level in self.up:
            for block in level.blocks:
                h = block(torch.cat([h, skips.pop()], dim=1), time_emb, y)
            if level.resample is not None:
                h = level.resample(h)

        return self.out_conv(self.out_activation(self.out_norm(h)))


def _check_arguments(
    in_channels, image_size, base_channels, channel_mults, num_res_blocks, time_emb_dim,
    attention_resolutions, norm, num_groups, dropout, activation, use_labels, num_classes,
) -> None:  # fmt: skip
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
        raise ConfigError(
            f"trainer.use_labels=true needs class labels, but the dataset has num_classes={num_classes}"
        )


def _check_conventions(
    base_channels, channel_mults, attention_resolutions, up_attention_resolutions, norm_eps, downsample_padding,
    attention_head_dim, time_embedding_order, time_embedding_freq_shift,
) -> None:  # fmt: skip
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
