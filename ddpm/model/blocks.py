"""The UNet's building blocks: normalization, the timestep embedding, self-attention, residual blocks, and
the changes of resolution (Ho et al. 2020, Appendix B; the architecture of PixelCNN++ / Wide ResNet blocks).

Shapes change with plain reshapes and permutes, each with its einops pattern beside it: einops' first call
registers its ops with torch._dynamo, which costs seconds at the start of every process on a CPU."""

import math

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"silu": nn.SiLU, "relu": nn.ReLU, "mish": nn.Mish}
NORMS = ("gn", "in", "bn", "none")
DOWNSAMPLE_PADDINGS = ("symmetric", "tf_same")
TIME_EMBEDDING_ORDERS = ("sin_cos", "cos_sin")


def make_norm(kind: str, channels: int, num_groups: int, eps: float = 1e-5) -> nn.Module:
    """A normalization layer by name: group, instance, batch, or none."""
    if kind == "gn":
        return nn.GroupNorm(num_groups, channels, eps=eps)
    if kind == "in":
        return nn.InstanceNorm2d(channels, eps=eps, affine=True)
    if kind == "bn":
        return nn.BatchNorm2d(channels, eps=eps)
    return nn.Identity()


def sinusoidal_embedding(
    t: torch.Tensor, dim: int, dtype: torch.dtype = torch.float32, *, freq_shift: float = 1, cos_first: bool = False
) -> torch.Tensor:
    """Transformer-style sin/cos features of the timestep (Vaswani et al. 2017, as used by DDPM), in `dtype`
    (the network's: float32, or float64 for a .double() model; autocast casts further where it runs).

    Frequency i of dim/2 is 10000^(-i / (dim/2 - freq_shift)): freq_shift=1 (the DDPM release's) spans
    1 ... 1/10000 exactly. `cos_first` puts the cosines first."""
    half = dim // 2
    frequencies = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=dtype) / (half - freq_shift))
    angles = t.to(dtype)[:, None] * frequencies[None, :]
    features = [angles.cos(), angles.sin()] if cos_first else [angles.sin(), angles.cos()]
    return torch.cat(features, dim=1)


class AttentionBlock(nn.Module):
    """Self-attention over all pixels, added to the input."""

    def __init__(self, channels: int, *, norm: str, num_groups: int, num_heads: int = 1, norm_eps: float = 1e-5):
        super().__init__()
        self.num_heads = num_heads
        self.norm = make_norm(norm, channels, num_groups, norm_eps)
        self.to_qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.to_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height = x.shape[2]
        # Token-major projections (the 1x1 convolutions' weights as matrices): q, k and v then have a
        # contiguous head dimension, which the flash and memory-efficient kernels of scaled_dot_product_attention
        # require (with a strided one they fall back to the slow math kernel). Free under channels_last.
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # b c h w -> b (h w) c
        qkv = F.linear(tokens, self.to_qkv.weight.flatten(1), self.to_qkv.bias)
        q, k, v = qkv.unflatten(2, (3, self.num_heads, -1)).permute(2, 0, 3, 1, 4)  # b n (3 heads d) -> 3 b heads n d
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)  # b heads n d -> b n (heads d)
        out = F.linear(out, self.to_out.weight.flatten(1), self.to_out.bias)
        return x + out.transpose(1, 2).unflatten(2, (height, -1))  # b (h w) c -> b c h w


class ResidualBlock(nn.Module):
    """norm-act-conv, plus time (and class) bias, norm-act-dropout-conv, plus skip; then optional attention."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        time_emb_dim: int,
        num_classes: int | None,
        dropout: float,
        norm: str,
        num_groups: int,
        activation: str,
        attention: bool,
        norm_eps: float = 1e-5,
        attention_head_dim: int | None = None,
    ):
        """`attention_head_dim`: channels per attention head; None = one head of all channels."""
        super().__init__()
        self.activation = ACTIVATIONS[activation]()
        self.norm_1 = make_norm(norm, in_channels, num_groups, norm_eps)
        self.conv_1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_bias = nn.Linear(time_emb_dim, out_channels)
        self.class_bias = nn.Embedding(num_classes, out_channels) if num_classes is not None else None
        self.norm_2 = make_norm(norm, out_channels, num_groups, norm_eps)
        self.dropout = nn.Dropout(dropout)
        self.conv_2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        heads = 1 if attention_head_dim is None else out_channels // attention_head_dim
        self.attention = (
            AttentionBlock(out_channels, norm=norm, num_groups=num_groups, num_heads=heads, norm_eps=norm_eps)
            if attention
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor, time_emb: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        h = self.conv_1(self.activation(self.norm_1(x)))
        bias = self.time_bias(self.activation(time_emb))
        if self.class_bias is not None:
            bias = bias + self.class_bias(y)
        h = h + bias[:, :, None, None]
        h = self.conv_2(self.dropout(self.activation(self.norm_2(h))))
        return self.attention(h + self.skip(x))


class Downsample(nn.Module):
    """Halves the resolution with a strided 3x3 convolution.

    `padding`: "symmetric" pads one pixel on every side; "tf_same" pads one pixel at the bottom and right only, as
    TensorFlow's "SAME" does for a stride-2 3x3 convolution of an even size (the DDPM release was trained so): the
    kernel's taps then sit one pixel further down and right, so the same weights give another function."""

    def __init__(self, channels: int, padding: str = "symmetric"):
        super().__init__()
        self.tf_same = padding == "tf_same"
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if self.tf_same else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.tf_same else x)


# Nearest-neighbour upsampling followed by a 3x3 convolution, seen from the low-resolution input: an output
# pixel in an even row reads input rows (i-1, i) with the kernel's rows (0, 1+2); an odd row reads (i, i+1) with
# rows (0+1, 2). The same holds for columns. PHASE_TAPS[a] maps the 3 kernel taps to the 2 of phase a.
PHASE_TAPS = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]], [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])


class Upsample(nn.Module):
    """Doubles the resolution: nearest-neighbour upsampling, then a 3x3 convolution.

    With `subpixel` (the default) the same function is computed as four 2x2 convolutions of the low-resolution
    input, one per output phase, interleaved: 16 instead of 36 multiply-adds per pixel and channel pair, and no
    4x larger intermediate. The weights stay those of the 3x3 convolution.
    """

    def __init__(self, channels: int, subpixel: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.subpixel = subpixel
        self.register_buffer("phase_taps", PHASE_TAPS.clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.subpixel:
            return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))
        height, width = x.shape[2:]
        taps = self.phase_taps.to(self.conv.weight.dtype)
        # (row phase a, column phase b, out, in, 2, 2) kernels, all four phases in one convolution.
        kernels = torch.einsum("apr,bqs,oirs->aboipq", taps, taps, self.conv.weight)
        out = F.conv2d(F.pad(x, (1, 1, 1, 1)), kernels.flatten(0, 2), self.conv.bias.repeat(4))  # (a b o) i p q
        out = out.unflatten(1, (2, 2, -1)).permute(1, 2, 0, 3, 4, 5)  # n (a b o) h w -> a b n o h w
        # Phase a's output for input row i sits at row i + a of the padded result.
        phases = torch.stack(
            [torch.stack([out[a, b, :, :, a : a + height, b : b + width] for b in (0, 1)]) for a in (0, 1)]
        )
        layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        interleaved = phases.permute(2, 3, 4, 0, 5, 1).flatten(4, 5).flatten(2, 3)  # a b n o h w -> n o (h a) (w b)
        return interleaved.contiguous(memory_format=layout)


class Level(nn.Module):
    """The residual blocks of one resolution, followed by an optional change of resolution."""

    def __init__(self, blocks: list[ResidualBlock], resample: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.resample = resample
