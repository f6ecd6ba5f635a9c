"""Classifier-free guidance: a null label learned by dropping labels in training, and the guided prediction
(1 + w) eps(x, y) - w eps(x, null) at sampling time."""

import pytest
import torch
from test_training import run_loop, tiny_diffusion

from ddpm.config.errors import ConfigError
from ddpm.diffusion.gaussian import GaussianDiffusion
from ddpm.diffusion.schedules import linear_betas
from ddpm.model.unet import UNet
from ddpm.training.settings import TrainSettings


def tiny(null_class: bool) -> GaussianDiffusion:
    torch.manual_seed(0)
    model = UNet(
        in_channels=1,
        image_size=16,
        base_channels=8,
        channel_mults=(1, 2),
        num_res_blocks=1,
        num_groups=4,
        use_labels=True,
        num_classes=10,
        null_class=null_class,
    )
    return GaussianDiffusion(model, linear_betas(50), 16, 1)


def test_the_null_label_is_one_more_class():
    assert tiny(null_class=True).model.null_label == 10
    assert tiny(null_class=False).model.null_label is None
    block = tiny(null_class=True).model.down[0].blocks[0]
    assert block.class_bias.num_embeddings == 11


def test_the_guided_prediction_mixes_conditional_and_unconditional():
    diffusion = tiny(null_class=True).eval()
    for parameter in diffusion.model.parameters():  # make the class bias matter
        torch.nn.init.normal_(parameter, std=0.05)
    x, t, y = torch.randn(3, 1, 16, 16), torch.tensor([5, 20, 40]), torch.tensor([1, 4, 7])
    w = 2.5
    with torch.no_grad():
        guided = diffusion.denoiser(y, use_ema=False, guidance_scale=w)(x, t).eps
        conditional = diffusion.model(x, t, y)
        unconditional = diffusion.model(x, t, torch.full_like(y, 10))
    torch.testing.assert_close(guided, (1 + w) * conditional - w * unconditional, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(conditional, unconditional)
    unguided = diffusion.denoiser(y, use_ema=False, guidance_scale=0.0)(x, t).eps
    torch.testing.assert_close(unguided, conditional)


@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_guidance_of_any_target_is_the_same_mix_of_the_implied_noise(prediction):
    """(1 + w) out_c - w out_u of x0 or v outputs implies (1 + w) eps_c - w eps_u: the conversions are affine."""
    diffusion = tiny(null_class=True).eval()
    diffusion.prediction = prediction
    for parameter in diffusion.model.parameters():
        torch.nn.init.normal_(parameter, std=0.05)
    x, t, y, w = torch.randn(3, 1, 16, 16), torch.tensor([5, 20, 40]), torch.tensor([1, 4, 7]), 1.5
    with torch.no_grad():
        guided = diffusion.denoiser(y, use_ema=False, guidance_scale=w)(x, t)
        conditional = diffusion.denoiser(y, use_ema=False)(x, t)
        unconditional = diffusion.denoiser(torch.full_like(y, 10), use_ema=False)(x, t)
    torch.testing.assert_close(guided.eps, (1 + w) * conditional.eps - w * unconditional.eps, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(guided.x0, (1 + w) * conditional.x0 - w * unconditional.x0, rtol=1e-4, atol=1e-4)


def test_guidance_is_refused_without_a_null_label():
    diffusion = tiny(null_class=False)
    with pytest.raises(ConfigError, match=r"sampler.guidance_scale=3.0 needs .* trainer.label_dropout > 0"):
        diffusion.sample(2, "cpu", torch.tensor([1, 2]), guidance_scale=3.0)


def test_label_dropout_needs_labels_and_a_valid_share():
    with pytest.raises(ConfigError, match="trainer.label_dropout=0.1 drops class labels"):
        TrainSettings(label_dropout=0.1, use_labels=False)
    with pytest.raises(ConfigError, match=r"trainer.label_dropout=1.0 must be in \[0, 1\)"):
        TrainSettings(label_dropout=1.0, use_labels=True)


def test_training_replaces_about_the_given_share_of_labels_by_the_null_label(tmp_path, monkeypatch):
    seen = []
    original = UNet.forward

    def recording_forward(self, x, t, y=None):
        if self.training:
            seen.append(y.clone())
        return original(self, x, t, y)

    monkeypatch.setattr(UNet, "forward", recording_forward)
    run_loop(
        tmp_path,
        diffusion=tiny_diffusion(null_class=True),
        iterations=8,
        label_dropout=0.5,
        log_rate=0,
        checkpoint_rate=0,
        sample_at_end=False,
    )
    labels = torch.cat(seen)
    share = (labels == 10).float().mean().item()
    assert labels.numel() == 8 * 16 and 0.35 < share < 0.65
