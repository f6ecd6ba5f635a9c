"""The datasets: CIFAR-10 through the real torchvision code on a tiny archive, the digits, and image folders.

Nothing here touches the network: the CIFAR-10 archive is written by the test with torchvision's checksums
pointed at it, and torchvision's download functions are replaced by ones that fail if they are reached.
"""

import hashlib
import pickle
import re
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision.datasets.utils
from PIL import Image
from torchvision.datasets import CIFAR10

from ddpm.config.errors import ConfigError, DatasetNotFoundError
from ddpm.data.cifar10 import ARCHIVE, cifar10
from ddpm.data.digits import digits
from ddpm.data.folder import folder

# ---------------------------------------------------------------------------------------------- CIFAR-10

PER_BATCH = 4  # images in each of the 5 train batches and in the test batch
LABEL_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
KNOWN_RGB = (255, 0, 128)  # pixel (row 0, column 0) of the first train image: both ends and the middle


def cifar_images(first_index: int, count: int) -> np.ndarray:
    """uint8 (count, 3, 32, 32): a value that depends on image, channel, row and column (never mirror-symmetric)."""
    n = np.arange(first_index, first_index + count).reshape(-1, 1, 1, 1)
    c = np.arange(3).reshape(1, -1, 1, 1)
    y = np.arange(32).reshape(1, 1, -1, 1)
    x = np.arange(32).reshape(1, 1, 1, -1)
    return ((n * 37 + c * 85 + y * 3 + x * 7) % 256).astype(np.uint8)


def cifar_labels(first_index: int, count: int) -> list[int]:
    return [(i * 3) % 10 for i in range(first_index, first_index + count)]


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def write_batch(path: Path, images: np.ndarray, labels: list[int], batch_label: str) -> None:
    """A batch file as the real CIFAR-10 ships it: "data" is (N, 3072), row-major, channel-first."""
    batch = {
        "batch_label": batch_label,
        "labels": labels,
        "data": images.reshape(len(images), 3 * 32 * 32),
        "filenames": [f"image_{i}.png" for i in range(len(images))],
    }
    path.write_bytes(pickle.dumps(batch, protocol=2))


def refuse_network(*args, **kwargs):
    raise AssertionError("the CIFAR-10 tests must not reach the network")


def write_cifar_archive(workdir: Path) -> SimpleNamespace:
    """`workdir/root` holding only `cifar-10-python.tar.gz` (real format, 4 images per batch)."""
    batches = workdir / "staging" / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    train_images = cifar_images(0, 5 * PER_BATCH)
    train_images[0, :, 0, 0] = KNOWN_RGB
    train_labels = cifar_labels(0, 5 * PER_BATCH)
    test_images = cifar_images(5 * PER_BATCH, PER_BATCH)
    test_labels = cifar_labels(5 * PER_BATCH, PER_BATCH)
    for b in range(5):
        part = slice(b * PER_BATCH, (b + 1) * PER_BATCH)
        name = f"data_batch_{b + 1}"
        write_batch(batches / name, train_images[part], train_labels[part], f"training batch {b + 1} of 5")
    write_batch(batches / "test_batch", test_images, test_labels, "testing batch 1 of 1")
    meta = {"label_names": LABEL_NAMES, "num_cases_per_batch": PER_BATCH, "num_vis": 3 * 32 * 32}
    (batches / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))

    root = workdir / "root"
    root.mkdir()
    with tarfile.open(root / ARCHIVE, "w:gz") as archive:
        archive.add(batches, arcname="cifar-10-batches-py")
    return SimpleNamespace(
        root=root,
        batches=batches,
        train_images=train_images,
        train_labels=train_labels,
        test_images=test_images,
        test_labels=test_labels,
    )


def trust_cifar_archive(patch: pytest.MonkeyPatch, written: SimpleNamespace) -> None:
    """Points torchvision's md5 sums at the written files, and makes any download attempt fail loudly."""
    batches = written.batches
    train_list = [[f"data_batch_{b}", md5(batches / f"data_batch_{b}")] for b in range(1, 6)]
    patch.setattr(CIFAR10, "train_list", train_list)
    patch.setattr(CIFAR10, "test_list", [["test_batch", md5(batches / "test_batch")]])
    meta_md5 = md5(batches / "batches.meta")
    patch.setattr(CIFAR10, "meta", {"filename": "batches.meta", "key": "label_names", "md5": meta_md5})
    patch.setattr(CIFAR10, "tgz_md5", md5(written.root / ARCHIVE))
    # download_url skips the download when the archive is there with the right md5; if not, fail loudly.
    patch.setattr(torchvision.datasets.utils, "_urlretrieve", refuse_network)
    patch.setattr(torchvision.datasets.utils, "_get_redirect_url", refuse_network)


@pytest.fixture(scope="module")
def tiny_cifar(tmp_path_factory):
    """The tiny archive, loaded three ways through the real torchvision code."""
    written = write_cifar_archive(tmp_path_factory.mktemp("cifar"))
    root = written.root
    with pytest.MonkeyPatch.context() as patch:
        trust_cifar_archive(patch, written)
        train_plain = cifar10(str(root), split="train", random_flip=False, download=True)  # extracts the archive
        train_flipped = cifar10(str(root), split="train", random_flip=True, download=True)
        test = cifar10(str(root), split="test", random_flip=True, download=True)

    def to_range(images):  # what the model should see: (v / 255) * 2 - 1
        return torch.from_numpy(images).float() / 255 * 2 - 1

    return SimpleNamespace(
        root=root,
        train_plain=train_plain,
        train_flipped=train_flipped,
        test=test,
        train_expected=to_range(written.train_images),
        train_labels=written.train_labels,
        test_expected=to_range(written.test_images),
        test_labels=written.test_labels,
    )


def is_same(a: torch.Tensor, b: torch.Tensor) -> bool:
    # ToTensor + Normalize computes (v/255 - 0.5) / 0.5: the same as (v/255)*2 - 1 up to float32 rounding.
    return torch.allclose(a, b, atol=1e-6, rtol=0)


def test_cifar10_extracts_the_archive_and_has_every_image(tiny_cifar):
    assert (tiny_cifar.root / "cifar-10-batches-py" / "data_batch_5").is_file()
    assert len(tiny_cifar.train_plain) == 5 * PER_BATCH
    assert len(tiny_cifar.test) == PER_BATCH
    assert tiny_cifar.train_plain.classes == LABEL_NAMES  # batches.meta was read


def test_cifar10_known_pixel_is_rgb_scaled_to_minus_one_one(tiny_cifar):
    image, _ = tiny_cifar.train_plain[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    red, green, blue = image[:, 0, 0].tolist()
    assert red == 1.0 and green == -1.0  # 255 -> 1 and 0 -> -1 exactly, in R, G, B order
    assert blue == pytest.approx(128 / 255 * 2 - 1, abs=1e-6)


def test_cifar10_images_and_labels_match_what_was_written(tiny_cifar):
    for index in range(len(tiny_cifar.train_plain)):
        image, label = tiny_cifar.train_plain[index]
        assert is_same(image, tiny_cifar.train_expected[index])
        assert label == tiny_cifar.train_labels[index]
    for index in range(len(tiny_cifar.test)):
        image, label = tiny_cifar.test[index]
        assert is_same(image, tiny_cifar.test_expected[index])
        assert label == tiny_cifar.test_labels[index]
    assert min(tiny_cifar.train_labels) >= 0 and max(tiny_cifar.train_labels) <= 9


def test_cifar10_train_flip_is_only_horizontal(tiny_cifar):
    torch.manual_seed(0)  # the flip draws from torch's global generator: fixed, so the test is deterministic
    seen = set()
    for _ in range(8):
        for index in range(len(tiny_cifar.train_flipped)):
            image, _ = tiny_cifar.train_flipped[index]
            original = tiny_cifar.train_expected[index]
            mirror = original.flip(-1)  # left-right
            assert not is_same(original, mirror)  # the images are asymmetric, so a flip is visible
            if is_same(image, original):
                seen.add("original")
            elif is_same(image, mirror):
                seen.add("mirror")
            else:
                pytest.fail(f"train image {index} is neither the original nor its left-right mirror")
    assert seen == {"original", "mirror"}  # random_flip=True flips some draws, not all


def test_cifar10_test_split_is_never_flipped_even_with_random_flip(tiny_cifar):
    torch.manual_seed(0)
    for _ in range(8):
        for index in range(len(tiny_cifar.test)):
            assert is_same(tiny_cifar.test[index][0], tiny_cifar.test_expected[index])


def test_cifar10_missing_archive_says_where_to_put_it(tmp_path):
    # download=False: torchvision only checks the directory, so nothing goes to the network.
    with pytest.raises(DatasetNotFoundError) as error:
        cifar10(str(tmp_path), split="train", download=False)
    assert ARCHIVE in str(error.value)
    assert str(tmp_path) in str(error.value)


def test_cifar10_rejects_another_image_size(tmp_path):
    with pytest.raises(ConfigError, match=re.escape("dataset.image_size")):
        cifar10(str(tmp_path), image_size=64, download=False)


# ---------------------------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digit_splits():
    return digits("train"), digits("test")


def test_digits_splits_cover_all_1797_images(digit_splits):
    train, test = digit_splits
    assert len(train) + len(test) == 1797
    assert len(test) == round(1797 * 0.1)


def test_digits_are_16x16_grayscale_spanning_minus_one_to_one(digit_splits):
    images = digit_splits[0].tensors[0]
    assert images.shape[1:] == (1, 16, 16) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    assert images.min() <= -0.99 and images.max() >= 0.99  # background and full ink both present


def test_digits_test_split_has_every_class(digit_splits):
    assert set(digit_splits[1].tensors[1].tolist()) == set(range(10))


def test_digits_split_is_the_same_on_every_call(digit_splits):
    again = digits("test")
    assert torch.equal(again.tensors[0], digit_splits[1].tensors[0])
    assert torch.equal(again.tensors[1], digit_splits[1].tensors[1])


def test_digits_at_native_size_8_keep_the_original_pixel_levels():
    images = digits("test", image_size=8).tensors[0]
    assert images.shape[1:] == (1, 8, 8)
    levels = (images + 1) * 8  # pixel values 0..16 scaled to [-1, 1] are k/8 - 1
    assert torch.allclose(levels, levels.round(), atol=1e-5)


def test_digits_reject_rgb_naming_the_key():
    with pytest.raises(ConfigError, match=re.escape("dataset.channels")):
        digits("train", channels=3)


# ---------------------------------------------------------------------------------------------- folder

RED, BLUE = (255, 0, 0), (0, 0, 255)


def write_png(path: Path, color, size=(40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


@pytest.fixture
def class_folders(tmp_path):
    """dog/ is written before cat/, so sorted names (cat=0, dog=1) differ from creation order."""
    write_png(tmp_path / "dog" / "d0.png", BLUE, size=(40, 30))
    write_png(tmp_path / "cat" / "c0.png", RED, size=(30, 40))
    write_png(tmp_path / "cat" / "c1.png", RED, size=(50, 50))
    (tmp_path / ".DS_Store").write_text("hidden files are not part of the dataset")
    return tmp_path


def test_folder_labels_follow_sorted_subfolder_names(class_folders):
    dataset = folder(str(class_folders), image_size=16, random_flip=False)
    assert dataset.classes == ["cat", "dog"]
    assert [dataset[i][1] for i in range(len(dataset))] == [0, 0, 1]  # cat/c0, cat/c1, dog/d0


def test_folder_images_are_resized_and_cropped_to_minus_one_one(class_folders):
    dataset = folder(str(class_folders), image_size=16, random_flip=False)
    for index in range(len(dataset)):
        image, _ = dataset[index]
        assert image.shape == (3, 16, 16)  # 40x30, 30x40 and 50x50 all end up square
        assert image.min() >= -1 and image.max() <= 1
    red_cat, _ = dataset[0]
    assert torch.allclose(red_cat[0], torch.ones(16, 16)) and torch.allclose(red_cat[1:], -torch.ones(2, 16, 16))


def test_folder_with_one_channel_gives_grayscale(class_folders):
    image, _ = folder(str(class_folders), image_size=16, channels=1)[0]
    assert image.shape == (1, 16, 16)


def test_folder_skips_hidden_files(class_folders):
    dataset = folder(str(class_folders), image_size=16)
    assert len(dataset) == 3
    assert all(path.suffix == ".png" for path in dataset.files)


def test_folder_refuses_files_that_are_not_images(class_folders):
    (class_folders / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(ConfigError, match=r"dataset.path=.*notes.txt"):
        folder(str(class_folders), image_size=16)


def test_folder_num_classes_must_match_the_subfolders(class_folders):
    assert folder(str(class_folders), image_size=16, num_classes=2) is not None
    with pytest.raises(ConfigError, match=re.escape("dataset.num_classes")):
        folder(str(class_folders), image_size=16, num_classes=3)


def test_flat_folder_has_no_labels(tmp_path):
    write_png(tmp_path / "a.png", RED)
    write_png(tmp_path / "b.png", BLUE)
    dataset = folder(str(tmp_path), image_size=16)
    assert dataset.classes == []
    assert [dataset[i][1] for i in range(len(dataset))] == [-1, -1]


def test_folder_has_no_test_split(tmp_path):
    # No held-out images: the test split is None (the trainer then skips the test loss), even for a bad path.
    assert folder(str(tmp_path / "nowhere"), split="test") is None


def test_folder_without_images_names_the_key(tmp_path):
    (tmp_path / "empty-class").mkdir()
    with pytest.raises(DatasetNotFoundError, match=re.escape("dataset.path")):
        folder(str(tmp_path))


def test_folder_that_does_not_exist(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=re.escape("dataset.path")):
        folder(str(tmp_path / "missing"))


def test_corrupt_image_is_named_before_training(tmp_path):
    write_png(tmp_path / "good.png", RED)
    (tmp_path / "bad.png").write_bytes(b"this is not a png")
    with pytest.raises(ConfigError, match=r"bad.png in dataset.path=.* is not a readable image"):
        folder(str(tmp_path), image_size=16)  # headers are read when the dataset is built


LOADER_LEFT_OPEN = """
import torch
from ddpm.data.loader import evaluation_batches
data = torch.utils.data.TensorDataset(torch.zeros(64, 1, 2, 2), torch.zeros(64))
loader = evaluation_batches(data, 4, num_workers=1)
left_open = iter(loader)  # referenced until the interpreter exits: its worker is still alive then
next(left_open)
print("exiting")
"""


def test_a_process_exits_with_a_data_loader_worker_still_alive():
    """The workers ignore SIGTERM (the main process handles preemption), which is what multiprocessing sends
    them at exit before waiting for them: without the exit handler that kills them the process hangs."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", LOADER_LEFT_OPEN], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "exiting" in result.stdout, result.stderr
    assert "Traceback" not in result.stderr, result.stderr  # a killed worker is not reported as a failure


def write_rgb16_png(path: Path, pixels: np.ndarray) -> None:
    """A 16-bit-per-channel RGB PNG, written chunk by chunk (Pillow writes no such files)."""
    import struct
    import zlib

    height, width, _ = pixels.shape
    rows = b"".join(b"\x00" + pixels[row].astype(">u2").tobytes() for row in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    )


# 16 x 16 levels over the whole range: the 8-bit value of level k is round(k * 255 / 255) = k
LEVELS = np.arange(256).reshape(16, 16)


@pytest.mark.parametrize(
    "mode, pixels, suffix",
    [
        ("I;16", (LEVELS * 257).astype(np.uint16), ".png"),
        ("I", (LEVELS * 257).astype(np.int32), ".tif"),
        ("F", (LEVELS / 255).astype(np.float32), ".tif"),
        ("RGB", None, ".png"),  # 16 bits per channel
    ],
)
def test_high_bit_depth_images_are_scaled_to_8_bits(tmp_path, mode, pixels, suffix):
    """A 16-bit grey PNG's values went through convert("L") clipped at 255: 96% of such pixels came out white."""
    path = tmp_path / f"image{suffix}"
    if pixels is None:
        write_rgb16_png(path, np.repeat((LEVELS * 257)[..., None], 3, axis=2))
    else:
        Image.fromarray(pixels).save(path)
    assert Image.open(path).mode == mode
    for channels in (1, 3):
        image, _ = folder(str(tmp_path), image_size=16, channels=channels, random_flip=False)[0]
        expected = torch.from_numpy(LEVELS / 127.5 - 1).float().expand(channels, 16, 16)
        torch.testing.assert_close(image, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "pixels, shown", [(np.full((4, 4), 70000, np.int32), "[70000, 70000]"), (np.full((4, 4), 2.5, np.float32), "[2.5")]
)
def test_pixels_outside_their_modes_range_are_refused_naming_the_file(tmp_path, pixels, shown):
    Image.fromarray(pixels).save(tmp_path / "odd.tif")
    with pytest.raises(ConfigError, match=rf"odd.tif in dataset.path=.*: its pixels .*{re.escape(shown)}") as caught:
        folder(str(tmp_path), image_size=4, channels=1)[0]
    assert "\n" not in str(caught.value)
