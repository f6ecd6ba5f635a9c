"""The one image generator (ddpm.diffusion.generation): image i depends on (seed, i) alone, whatever the batch size, the
sampler or the number of images drawn; and samples are written atomically."""

from functools import partial

import numpy as np
import pytest
import torch

from ddpm.diffusion.gaussian import GaussianDiffusion
from ddpm.diffusion.generation import as_arrays, balanced_labels, draw_images, image_seed
from ddpm.diffusion.samplers import ddim, ddpm_ancestral, dpm_solver, heun
from ddpm.diffusion.schedules import linear_betas
from ddpm.evaluation.samples import save_npz
from ddpm.model.unet import UNet

CPU = torch.device("cpu")
SAMPLERS = {
    "ddpm": ddpm_ancestral,
    "ddim-eta1": partial(ddim, steps=5, eta=1.0),
    "dpm_solver": partial(dpm_solver, steps=4),
    "dpm_solver_sde": partial(dpm_solver, steps=4, eta=1.0),
    "heun": partial(heun, steps=3),
}


@pytest.fixture(scope="module")
def diffusion():
    torch.manual_seed(0)
    model = UNet(
        in_channels=1,
        image_size=8,
        base_channels=8,
        channel_mults=(1,),
        num_res_blocks=1,
        num_groups=4,
        attention_resolutions=(),
        dropout=0.0,
        use_labels=True,
        num_classes=3,
    )
    return GaussianDiffusion(model, linear_betas(50), 8, 1).eval()


def draw(diffusion, sampler, images: range, batch_size: int, seed: int = 0) -> np.ndarray:
    labels = balanced_labels(images.stop, [0, 1, 2])
    batches = draw_images(
        diffusion, sampler, images=images, batch_size=batch_size, seed=seed, device=CPU, labels=labels
    )
    return torch.cat([batch.images for batch in batches]).numpy()


@pytest.mark.parametrize("name", SAMPLERS)
def test_image_i_depends_on_the_seed_and_i_alone(diffusion, name):
    sampler = SAMPLERS[name]
    whole = draw(diffusion, sampler, range(10), batch_size=4)
    # The first N images of a larger run are an N-image run (within the rounding of kernels at other batch sizes).
    np.testing.assert_allclose(draw(diffusion, sampler, range(3), batch_size=3), whole[:3], atol=1e-4)
    # Any range of images, e.g. a shard, is the same images as in the whole run.
    np.testing.assert_allclose(draw(diffusion, sampler, range(5, 10), batch_size=2), whole[5:], atol=1e-4)
    assert not np.allclose(draw(diffusion, sampler, range(3), batch_size=3, seed=1), whole[:3], atol=1e-2)
    assert not np.allclose(whole[0], whole[1], atol=1e-2)  # every image its own noise


def test_labels_and_seeds_are_functions_of_the_index():
    assert balanced_labels(7, [3, 5]).tolist() == [3, 5, 3, 5, 3, 5, 3]
    assert image_seed(0, 1) == image_seed(0, 1) != image_seed(0, 2) != image_seed(1, 1)


def test_as_arrays_gives_the_npz_layout(diffusion):
    arrays = as_arrays(
        draw_images(
            diffusion,
            SAMPLERS["dpm_solver"],
            images=range(5),
            batch_size=2,
            seed=0,
            device=CPU,
            labels=balanced_labels(5, [0, 1, 2]),
        )
    )
    assert arrays["arr_0"].shape == (5, 8, 8, 1) and arrays["arr_0"].dtype == np.uint8
    assert arrays["arr_1"].tolist() == [0, 1, 2, 0, 1]


def test_a_failed_npz_write_leaves_no_file_behind(tmp_path, monkeypatch):
    """task=sample and task=evaluate write through save_npz: a write that dies half-way leaves the old file (or
    none) and no partial one."""
    target = tmp_path / "samples.npz"
    save_npz(target, {"arr_0": np.zeros((2, 4, 4, 1), np.uint8)})
    before = target.read_bytes()

    def dies_half_way(file, **arrays):
        file.write(b"PK\x03\x04 half an archive")
        raise OSError("No space left on device")

    monkeypatch.setattr(np, "savez", dies_half_way)
    with pytest.raises(OSError, match="No space left"):
        save_npz(target, {"arr_0": np.ones((2, 4, 4, 1), np.uint8)})
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.npz"]
