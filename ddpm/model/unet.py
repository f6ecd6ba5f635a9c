"""The noise-prediction network: the DDPM UNet (Ho et al. 2020, Appendix B), optionally class-conditional.

It maps (x_t, t, y) to a tensor of x_t's shape and knows nothing about noise schedules.
At the CIFAR-10 defaults it has the paper's 35.7M parameters.
"""

from collections.abc import Sequence

import torch
from torch import nn

from ddpm.config.type_checks import config_types
from ddpm.model.architecture import check_architecture, check_conventions
from ddpm.model.blocks import (
    ACTIVATIONS,
    Downsample,
    Level,
    ResidualBlock,
    Upsample,
    make_norm,
    sinusoidal_embedding,
)


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
        check_architecture(
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
        )
        check_conventions(
            base_channels,
            channel_mults,
            attention_resolutions,
            up_attention_resolutions,
            norm_eps,
            downsample_padding,
            attention_head_dim,
            time_embedding_order,
            time_embedding_freq_shift,
        )
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
