"""DeviceBatches (on the CPU): the same batches as TrainingBatches, exact resume, rank shares, and which datasets
`in_memory_images` takes. CIFAR-10 is the tiny archive of test_data.py, read by the real torchvision code."""

import pytest
import torch
from test_data import PER_BATCH, trust_cifar_archive, write_cifar_archive, write_png

from ddpm.config.errors import ConfigError
from ddpm.data.cifar10 import cifar10
from ddpm.data.device import DeviceBatches, InMemoryImages, in_memory_images
from ddpm.data.digits import digits
from ddpm.data.folder import folder
from ddpm.data.loader import EpochOrder, TrainingBatches

CPU = torch.device("cpu")


def take(batches, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [next(batches) for _ in range(count)]


def assert_same_batches(got, expected, atol: float = 0.0) -> None:
    assert len(got) == len(expected)
    for (x, y), (x_expected, y_expected) in zip(got, expected, strict=True):
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert torch.allclose(x, x_expected, atol=atol, rtol=0) and torch.equal(y, y_expected)


def synthetic(num_items: int = 10, random_flip: bool = True) -> InMemoryImages:
    """uint8 images with a distinct, mirror-asymmetric pattern each; label = index."""
    images = torch.randint(0, 256, (num_items, 3, 4, 4), generator=torch.Generator().manual_seed(0))
    return InMemoryImages(images.to(torch.uint8), torch.arange(num_items), random_flip)


# ---------------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize("taken", [0, 2, 3, 4])  # 3 batches per epoch: before, at and after the boundary
def test_resume_continues_with_identical_batches(taken):
    uninterrupted = DeviceBatches(synthetic(), 3, seed=5, device=CPU)
    interrupted = DeviceBatches(synthetic(), 3, seed=5, device=CPU)
    take(uninterrupted, taken)
    take(interrupted, taken)
    resumed = DeviceBatches(synthetic(), 3, seed=5, device=CPU)
    resumed.load_state_dict(interrupted.state_dict())
    assert resumed.state_dict() == uninterrupted.state_dict()
    assert_same_batches(take(resumed, 7), take(uninterrupted, 7))


def test_state_saved_with_another_batch_size_starts_the_next_epoch():
    batches = DeviceBatches(synthetic(), 3, seed=5, device=CPU)  # 3 batches per epoch
    batches.load_state_dict({"epoch": 2, "batch": 4, "batch_size": 2, "seed": 5})
    assert (batches.epoch, batches.batch) == (3, 0)
    fresh = DeviceBatches(synthetic(), 3, seed=5, device=CPU)
    take(fresh, 9)
    assert_same_batches(take(batches, 2), take(fresh, 2))


def test_batch_larger_than_the_data_is_a_config_error():
    with pytest.raises(ConfigError, match="trainer.batch_size=12"):
        DeviceBatches(synthetic(), 6, seed=0, device=CPU, world_size=2)


# ---------------------------------------------------------------------------------------------- ranks


def test_ranks_share_each_global_batch_without_overlap():
    num_items, batch = 23, 3
    data = InMemoryImages(torch.arange(num_items).float().view(-1, 1, 1, 1), torch.arange(num_items), False)
    ranks = [DeviceBatches(data, batch, seed=1, device=CPU, rank=r, world_size=2) for r in range(2)]
    single = DeviceBatches(data, 2 * batch, seed=1, device=CPU)
    assert ranks[0].batches_per_epoch == single.batches_per_epoch == 3
    for _ in range(7):  # across two epoch boundaries
        shares = [next(rank) for rank in ranks]
        whole_x, whole_y = next(single)
        assert not set(shares[0][1].tolist()) & set(shares[1][1].tolist())
        assert torch.equal(torch.cat([y for _, y in shares]), whole_y)
        assert torch.equal(torch.cat([x for x, _ in shares]), whole_x)
        assert torch.equal(whole_x.flatten().long(), whole_y)  # the pixel is the index: images follow labels


# ---------------------------------------------------------------------------------------------- digits


def test_digits_give_the_same_batches_as_training_batches():
    dataset = digits("train")
    data = in_memory_images(dataset)
    assert data is not None and data.images.dtype == torch.float32 and not data.random_flip
    device_batches = DeviceBatches(data, 64, seed=3, device=CPU)
    loader_batches = TrainingBatches(dataset, 64, seed=3, num_workers=0)
    count = device_batches.batches_per_epoch + 2  # into the second epoch
    assert_same_batches(take(device_batches, count), take(loader_batches, count), atol=1e-6)


# ---------------------------------------------------------------------------------------------- CIFAR-10


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    written = write_cifar_archive(tmp_path_factory.mktemp("cifar"))
    with pytest.MonkeyPatch.context() as patch:
        trust_cifar_archive(patch, written)
        plain = cifar10(str(written.root), split="train", random_flip=False)
        flipped = cifar10(str(written.root), split="train", random_flip=True)
        test = cifar10(str(written.root), split="test", random_flip=True)
    return written, plain, flipped, test


def test_cifar10_in_memory_is_the_uint8_archive_with_flips_for_train_only(cifar):
    written, plain, flipped, test = cifar
    data = in_memory_images(flipped)
    assert data.images.dtype == torch.uint8 and data.images.shape == (5 * PER_BATCH, 3, 32, 32)
    assert torch.equal(data.images, torch.from_numpy(written.train_images))  # NCHW, as the archive stores it
    assert data.labels.tolist() == written.train_labels and data.labels.dtype == torch.int64
    assert data.random_flip and not in_memory_images(plain).random_flip
    assert not in_memory_images(test).random_flip


def test_cifar10_unflipped_batches_are_the_dataset_images(cifar):
    _, plain, _, _ = cifar
    batches = DeviceBatches(in_memory_images(plain), 4, seed=7, device=CPU)
    order = iter(EpochOrder(len(plain), 4, seed=7))
    for _ in range(7):
        x, y = next(batches)
        _, indices = next(order)
        assert torch.allclose(x, torch.stack([plain[i][0] for i in indices]), atol=1e-6, rtol=0)
        assert y.tolist() == [plain[i][1] for i in indices]


def test_cifar10_flips_are_mirrors_about_half_the_time_and_reproducible(cifar):
    _, plain, flipped, _ = cifar
    batches = DeviceBatches(in_memory_images(flipped), 4, seed=7, device=CPU)
    order = iter(EpochOrder(len(flipped), 4, seed=7))
    mirrored = 0
    for _ in range(50):
        x, _ = next(batches)
        _, indices = next(order)
        for image, index in zip(x, indices, strict=True):
            original = plain[index][0]
            if torch.allclose(image, original.flip(-1), atol=1e-6, rtol=0):
                mirrored += 1
            else:
                assert torch.allclose(image, original, atol=1e-6, rtol=0)
    assert 70 <= mirrored <= 130  # of 200 images

    def first_batches(seed):
        return take(DeviceBatches(in_memory_images(flipped), 4, seed=seed, device=CPU), 5)

    assert_same_batches(first_batches(7), first_batches(7))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first_batches(7), first_batches(8), strict=True))


def test_cifar10_flipped_batches_equal_training_batches(cifar):
    # Same order and the same flip draws as the PIL path, so switching loaders does not change what is trained on.
    _, _, flipped, _ = cifar
    device_batches = DeviceBatches(in_memory_images(flipped), 4, seed=11, device=CPU)
    loader_batches = TrainingBatches(flipped, 4, seed=11, num_workers=0)
    assert_same_batches(take(device_batches, 12), take(loader_batches, 12), atol=1e-6)


# ---------------------------------------------------------------------------------------------- others


def test_folder_images_stay_on_the_data_loader(tmp_path):
    write_png(tmp_path / "a.png", (255, 0, 0))
    assert in_memory_images(folder(str(tmp_path), image_size=16)) is None
