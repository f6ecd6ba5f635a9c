"""The per-image noise streams (ddpm.diffusion.samplers.ImageNoise): splitmix64 and Box-Muller as written by hand,
normal statistics, rows independent of their batch, and a draw that costs the same kernels for any batch size."""

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch.utils._python_dispatch import TorchDispatchMode

from ddpm.diffusion.generation import image_seed
from ddpm.diffusion.samplers import ImageNoise, gaussian_like

KEYS = [0, 12345, 2**63 + 7, 2**64 - 1, image_seed(3, 9)]


def reference(key: int, draw: int, element: int) -> float:
    """The value of element j of draw k of the stream keyed `key`, in Python's unbounded integers."""
    z = (key + ((draw << 32) + element) * 0x9E3779B97F4A7C15) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    z ^= z >> 31
    u1, u2 = ((z >> 32) + 0.5) / 2**32, (z & 0xFFFFFFFF) / 2**32
    return math.sqrt(-2 * math.log(u1)) * math.cos(2 * math.pi * u2)


def test_values_are_splitmix64_and_box_muller_written_out():
    noise = ImageNoise(KEYS, "cpu")
    draws = [noise.normal((len(KEYS), 2, 3), torch.float64) for _ in range(3)]
    for i, key in enumerate(KEYS):
        for k, drawn in enumerate(draws):
            expected = [reference(key, k, j) for j in range(6)]
            # float32 uniforms: equal to the exact formula to their rounding
            np.testing.assert_allclose(drawn[i].flatten().numpy(), expected, atol=2e-6)


def test_a_row_depends_on_its_seed_and_draw_count_alone():
    seeds = [image_seed(0, i) for i in range(6)]
    whole = ImageNoise(seeds, "cpu")
    first, second = whole.normal((6, 3, 4, 4), torch.float32), whole.normal((6, 3, 4, 4), torch.float32)
    part = ImageNoise(seeds[2:4], "cpu")
    assert torch.equal(part.normal((2, 3, 4, 4), torch.float32), first[2:4])
    assert torch.equal(part.normal((2, 3, 4, 4), torch.float32), second[2:4])
    assert not torch.allclose(first, second)
    assert not torch.allclose(first[0], first[1])


def test_the_noise_is_standard_normal_and_uncorrelated():
    noise = ImageNoise([image_seed(1, i) for i in range(256)], "cpu")
    a = noise.normal((256, 3, 16, 16), torch.float64)
    b = noise.normal((256, 3, 16, 16), torch.float64)
    sample = a.flatten().numpy()
    assert abs(sample.mean()) < 0.01 and abs(sample.var() - 1) < 0.01
    assert stats.kstest(sample, "norm").pvalue > 0.01
    # between images, between draws of one image, between neighbouring elements
    assert abs(np.corrcoef(a[:, 0, 0, 0], a[:, 0, 0, 1])[0, 1]) < 0.15
    assert abs(np.corrcoef(a.flatten(), b.flatten())[0, 1]) < 0.01
    assert abs(np.corrcoef(sample[:-1], sample[1:])[0, 1]) < 0.01


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def test_a_draw_launches_the_same_kernels_for_any_batch():
    """A torch.Generator per image would launch one randn per image; the streams draw the batch at once."""
    counts = []
    for size in (1, 64):
        noise = ImageNoise(range(size), "cpu")
        x = torch.empty(size, 3, 8, 8)
        with CountOps() as counter:
            gaussian_like(x, noise)
        counts.append(counter.ops)
    assert counts[0] == counts[1] < 40  # a few dozen elementwise kernels


def test_a_batch_of_another_size_is_refused():
    with pytest.raises(ValueError, match="noise streams for 2 images cannot draw a batch of 3"):
        ImageNoise([1, 2], "cpu").normal((3, 4), torch.float32)
