"""Noise of one stream per image, drawn for the whole batch in one pass of elementwise kernels.

A torch.Generator per image makes image i independent of its batch, but costs one `randn` launch per image at
every stochastic step (about 256k launches for a batch of 1000-step DDPM sampling). Here the stream is
counter-based instead: element j of the k-th draw of image i is a function of (key_i, k, j) alone, the
splitmix64 sequence of key_i at position k * 2**32 + j, turned into a normal by Box-Muller. The same integer
arithmetic on every device type gives the same noise on the CPU and on a GPU (to the rounding of log and cos).
"""

import math
from collections.abc import Sequence

import torch

_GOLDEN = 0x9E3779B97F4A7C15  # splitmix64's increment
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_MAX_ELEMENTS = 2**32  # per image and draw: the draw index sits above these bits


def _int64(value: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits (torch has no uint64 arithmetic)."""
    return value - 2**64 if value >= 2**63 else value


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """The logical right shift of int64 bits (torch's >> is arithmetic: it copies the sign bit)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's output function on int64 tensors (multiplication wraps around, as in uint64)."""
    x = (x ^ _shift_right(x, 30)) * _int64(_MIX1)
    x = (x ^ _shift_right(x, 27)) * _int64(_MIX2)
    return x ^ _shift_right(x, 31)


class ImageNoise:
    """N(0, I) noise with its own stream per image: `ImageNoise(seeds, device).normal(shape, dtype)` gives a
    [len(seeds), ...] batch whose row i depends on seeds[i] and on how many draws came before, never on the
    other rows. Pass it as a sampler's `generator`."""

    def __init__(self, seeds: Sequence[int], device: torch.device | str):
        self.keys = torch.tensor([_int64(seed % 2**64) for seed in seeds], dtype=torch.int64, device=device)
        self.draws = 0

    def __len__(self) -> int:
        return len(self.keys)

    def normal(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        if shape[0] != len(self):
            raise ValueError(f"noise streams for {len(self)} images cannot draw a batch of {shape[0]}")
        numel = math.prod(shape[1:])
        if numel > _MAX_ELEMENTS:
            raise ValueError(f"images of {numel} elements are more than one draw can number ({_MAX_ELEMENTS})")
        positions = torch.arange(numel, dtype=torch.int64, device=self.keys.device) + (self.draws << 32)
        self.draws += 1
        bits = splitmix64(self.keys[:, None] + positions[None, :] * _int64(_GOLDEN))
        # Two 32-bit uniforms from the high and low halves; u1 in (0, 1) keeps the log finite.
        u1 = (_shift_right(bits, 32).to(torch.float32) + 0.5) * 2.0**-32
        u2 = (bits & 0xFFFFFFFF).to(torch.float32) * 2.0**-32
        normal = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2 * math.pi) * u2)
        return normal.to(dtype).reshape(tuple(shape))
