"""The UNet: output shapes, the DDPM paper's parameter count, and its argument checks."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import compose_config
from einops import rearrange
from hydra.utils import instantiate
from torch.nn.attention import SDPBackend, sdpa_kernel

from ddpm.config.errors import ConfigError
from ddpm.model.blocks import AttentionBlock, Upsample
from ddpm.model.unet import UNet

SMALL = dict(base_channels=16, channel_mults=(1, 2), num_res_blocks=1, num_groups=8)


@pytest.mark.parametrize("channels, size", [(1, 16), (3, 32), (3, 24)])
@pytest.mark.parametrize("use_labels", [False, True])
def test_output_has_the_input_shape(channels, size, use_labels):
    model = UNet(in_channels=channels, image_size=size, use_labels=use_labels, num_classes=10, **SMALL)
    x = torch.randn(3, channels, size, size)
    y = torch.tensor([0, 5, 9]) if use_labels else None
    assert model(x, torch.tensor([0, 10, 999]), y).shape == x.shape


def test_class_labels_change_the_prediction():
    torch.manual_seed(0)
    model = UNet(in_channels=1, image_size=16, use_labels=True, num_classes=10, **SMALL)
    torch.nn.init.normal_(model.down[0].blocks[0].class_bias.weight)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 3])
    assert not torch.allclose(model(x, t, torch.tensor([1, 1])), model(x, t, torch.tensor([2, 2])))


def test_conditional_model_requires_labels():
    model = UNet(in_channels=1, image_size=16, use_labels=True, num_classes=10, **SMALL)
    with pytest.raises(ValueError, match="use_labels"):
        model(torch.randn(1, 1, 16, 16), torch.tensor([1]))


def test_num_classes_is_ignored_without_labels():
    model = UNet(in_channels=1, image_size=16, use_labels=False, num_classes=10, **SMALL)
    assert model.num_classes is None
    assert not any("class_bias" in name for name, _ in model.named_parameters())


def test_default_config_is_the_ddpm_papers_35_7m_parameter_model():
    model = instantiate(compose_config().model)
    count = sum(p.numel() for p in model.parameters())
    assert count == pytest.approx(35.7e6, rel=0.01)
    assert count == 35_746_307  # the official TensorFlow implementation's count


@pytest.mark.parametrize("norm", ["gn", "in", "bn", "none", None])
@pytest.mark.parametrize("activation", ["silu", "relu", "mish"])
def test_every_norm_and_activation_runs(norm, activation):
    model = UNet(in_channels=3, image_size=8, norm=norm, activation=activation, **SMALL)
    assert model(torch.randn(2, 3, 8, 8), torch.tensor([1, 2])).shape == (2, 3, 8, 8)


def test_attention_uses_scaled_dot_product_attention(monkeypatch):
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(
        torch.nn.functional,
        "scaled_dot_product_attention",
        lambda *a, **k: calls.append(a[0].shape) or original(*a, **k),
    )
    model = UNet(in_channels=1, image_size=16, attention_resolutions=(1,), **SMALL)
    model(torch.randn(2, 1, 16, 16), torch.tensor([1, 2]))
    # Level 1 (8x8) on the way down and up, and the middle block (8x8): (batch, heads, pixels, head_dim).
    assert calls and all(shape[:3] == (2, 1, 64) for shape in calls)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(image_size=30, channel_mults=(1, 2, 2, 2)), r"model\.image_size=30 must be a multiple of .*=8"),
        (dict(attention_resolutions=(4,)), r"model\.attention_resolutions contains 4.*0\.\.3"),
        (dict(base_channels=48, num_groups=32), r"model\.num_groups=32 must divide"),
        (dict(activation="gelu"), r"model\.activation='gelu' is not one of"),
        (dict(norm="ln"), r"model\.norm='ln' is not one of"),
        (dict(dropout=1.5), r"model\.dropout=1\.5"),
        (dict(num_res_blocks=0), r"model\.num_res_blocks=0"),
        (dict(channel_mults=()), r"model\.channel_mults"),
        (dict(use_labels=True, num_classes=None), r"trainer\.use_labels=true needs class labels"),
    ],
)
def test_impossible_architectures_are_rejected_naming_the_key(kwargs, message):
    arguments = dict(in_channels=3, image_size=32, base_channels=32, channel_mults=(1, 2, 2, 2), num_groups=8)
    with pytest.raises(ConfigError, match=message):
        UNet(**{**arguments, **kwargs})


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
def test_attention_takes_the_flash_kernel_in_either_layout_and_equals_the_1x1_convolution_form(layout):
    block = AttentionBlock(64, norm="gn", num_groups=8).to(memory_format=layout)
    x = torch.randn(2, 64, 8, 8).contiguous(memory_format=layout)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises where q, k, v would need the math fallback
        out = block(x)
    # The textbook form: 1x1 convolutions and an explicit softmax over pixels.
    h = block.norm(x)
    q, k, v = rearrange(block.to_qkv(h), "b (qkv c) h w -> qkv b (h w) c", qkv=3)
    weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(64), dim=-1)
    expected = x + block.to_out(rearrange(weights @ v, "b (h w) c -> b c h w", h=8))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
def test_subpixel_upsampling_is_nearest_upsampling_then_the_3x3_convolution(layout):
    upsample = Upsample(32).to(memory_format=layout)
    x = torch.randn(2, 32, 5, 7).contiguous(memory_format=layout).requires_grad_()
    fast = upsample(x)
    fast.square().sum().backward()
    fast_grads = [x.grad.clone(), upsample.conv.weight.grad.clone()]
    x.grad, upsample.conv.weight.grad = None, None
    plain = upsample.conv(F.interpolate(x, scale_factor=2, mode="nearest"))
    plain.square().sum().backward()
    assert fast.is_contiguous(memory_format=layout)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    for got, want in zip(fast_grads, [x.grad, upsample.conv.weight.grad], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_a_float64_model_runs_in_float64_end_to_end():
    """The time embedding follows the network's dtype: .double() gives float64 predictions, losses and samples."""
    from ddpm.diffusion.gaussian import GaussianDiffusion
    from ddpm.diffusion.samplers import ddim
    from ddpm.diffusion.schedules import linear_betas

    torch.manual_seed(0)
    model = UNet(in_channels=1, image_size=8, base_channels=8, channel_mults=(1, 2), num_res_blocks=1, num_groups=4)
    diffusion = GaussianDiffusion(model, linear_betas(50), 8, 1).double()
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    assert model(x, torch.tensor([0, 9])).dtype == torch.float64
    assert diffusion(x).dtype == torch.float64
    samples = diffusion.sample(2, "cpu", sampler=lambda *args, **kwargs: ddim(*args, steps=3, **kwargs))
    assert samples.dtype == torch.float64 and torch.isfinite(samples).all()
