"""The loop's pieces: settings checks, warmup, early stopping, checkpoints, and a short real run in-process."""

import pickle

import pytest
import torch

from ddpm.checkpoint import load_checkpoint, save_checkpoint
from ddpm.data.digits import digits
from ddpm.data.loader import TrainingBatches
from ddpm.diffusion import GaussianDiffusion
from ddpm.ema import EMA
from ddpm.errors import CheckpointError, ConfigError
from ddpm.loggers import LocalLogger
from ddpm.schedules import linear_betas
from ddpm.training import TrainSettings, resolve_device, should_stop_early, train, warmup_lr
from ddpm.unet import UNet


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("batch_size", 0, "trainer.batch_size=0 must be >= 1"),
        ("iterations", -5, "trainer.iterations=-5 must be >= 1"),
        ("log_rate", -1, "trainer.log_rate=-1 must be >= 0"),
        ("ema_decay", 1.0, "trainer.ema_decay=1.0 must be in [0, 1)"),
        ("batch_size", "64", "trainer.batch_size='64' must be of type int"),
        ("use_labels", 1, "trainer.use_labels=1 must be of type bool"),
        ("grad_clip", True, "trainer.grad_clip=True must be of type float"),
    ],
)
def test_settings_name_the_bad_key_and_value(field, value, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(")", r"\)")):
        TrainSettings(**{field: value})


def test_settings_accept_an_int_where_a_float_is_expected():
    assert TrainSettings(grad_clip=1).grad_clip == 1


def test_early_stopping_needs_a_window_of_logs_then_compares_mean_change():
    flat = [0.05] * 11
    assert not should_stop_early(flat[:10], threshold=1e-3)  # not more than 10 intervals yet
    assert should_stop_early(flat, threshold=1e-3)
    falling = [0.1 - 0.01 * i for i in range(11)]  # changes of 0.01 per interval
    assert not should_stop_early(falling, threshold=0.005)
    assert should_stop_early(falling, threshold=0.02)
    assert not should_stop_early(flat, threshold=0)  # 0 disables


def test_warmup_is_linear_then_constant():
    assert warmup_lr(0, 1.0, 4) == 0.25
    assert warmup_lr(3, 1.0, 4) == 1.0
    assert warmup_lr(100, 1.0, 4) == 1.0
    assert warmup_lr(0, 2e-4, 0) == 2e-4


def test_devices():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="trainer.device='gpu0'"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")


def test_batch_larger_than_the_dataset_is_refused():
    with pytest.raises(ConfigError, match="trainer.batch_size=5000"):
        next(TrainingBatches(digits(), 5000, num_workers=0, seed=0))


def test_training_order_depends_on_the_seed_alone():
    first = next(TrainingBatches(digits(), 16, num_workers=0, seed=3))[1]
    second = next(TrainingBatches(digits(), 16, num_workers=0, seed=3))[1]
    other = next(TrainingBatches(digits(), 16, num_workers=0, seed=4))[1]
    assert torch.equal(first, second) and not torch.equal(first, other)


def test_checkpoint_round_trip_and_no_temporary_files_left(tmp_path):
    state = {"model": {"w": torch.ones(2)}, "step": 7, "config": {"a": [1, 2]}}
    save_checkpoint(tmp_path / "last.pt", state)
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    loaded = load_checkpoint(tmp_path / "last.pt")
    assert loaded["step"] == 7 and torch.equal(loaded["model"]["w"], torch.ones(2))


def test_checkpoint_errors_name_the_path(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"weights": torch.ones(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"not a ddpm checkpoint.*\['weights'\]"):
        load_checkpoint(tmp_path / "other.pt")
    (tmp_path / "truncated.pt").write_bytes((tmp_path / "other.pt").read_bytes()[:40])
    with pytest.raises(CheckpointError, match="truncated.pt is not a readable checkpoint"):
        load_checkpoint(tmp_path / "truncated.pt")


class WritesAFile:
    """Unpickling this would run code; weights_only loading must refuse it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pt", "wb") as file:
        torch.save({"model": WritesAFile(str(marker)), "step": 1, "config": {}}, file, pickle_module=pickle)
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


def tiny_diffusion(use_labels=True):
    model = UNet(in_channels=1, image_size=16, base_channels=16, channel_mults=(1, 2), num_res_blocks=1,
                 num_groups=8, use_labels=use_labels, num_classes=10)  # fmt: skip
    return GaussianDiffusion(model, linear_betas(50), 16, 1, ema=EMA(model, decay=0.9, start=2))


class RecordingLogger(LocalLogger):
    def __init__(self, run_dir):
        super().__init__(run_dir, {})
        self.metrics, self.images = [], []

    def log(self, metrics, step):
        self.metrics.append((step, metrics))

    def log_image(self, key, path, step, caption=None):
        self.images.append((key, step))


def run_loop(tmp_path, **overrides):
    torch.manual_seed(0)
    diffusion = tiny_diffusion()
    settings = TrainSettings(**{"iterations": 8, "batch_size": 16, "use_labels": True, "log_rate": 2,
                                "checkpoint_rate": 4, "sample_rate": 0, "grid_columns": 1, "device": "cpu",
                                "num_workers": 0, "test_batches": 1, **overrides})  # fmt: skip
    logger = RecordingLogger(tmp_path)
    optimizer = torch.optim.Adam(diffusion.model.parameters(), lr=1e-3)
    summary = train(
        diffusion, optimizer, TrainingBatches(digits(), 16, num_workers=0, seed=0), settings,
        device=torch.device("cpu"), run_dir=tmp_path, logger=logger, config={"note": "test"},
        test_loader=torch.utils.data.DataLoader(digits(split="test"), batch_size=16),
    )  # fmt: skip
    return diffusion, logger, summary


def test_the_loop_logs_checkpoints_and_samples(tmp_path):
    diffusion, logger, summary = run_loop(tmp_path)
    assert [step for step, _ in logger.metrics] == [2, 4, 6, 8]
    assert all({"train_loss", "test_loss", "lr"} <= set(m) for _, m in logger.metrics)
    assert summary["steps"] == 8 and not summary["stopped_early"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.pt", "step_0000004.pt", "step_0000008.pt"]
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert state["step"] == 8 and state["config"] == {"note": "test"}
    assert state["ema"]["_extra_state"]["num_updates"] == 8
    for name, tensor in diffusion.model.state_dict().items():
        assert torch.equal(state["model"][name], tensor)
    assert logger.images == [("samples", 8)] and (tmp_path / "samples" / "final.png").is_file()


def test_the_test_loss_is_a_function_of_the_weights_alone(tmp_path):
    _, first, _ = run_loop(tmp_path / "a")
    _, second, _ = run_loop(tmp_path / "b")
    assert [m["test_loss"] for _, m in first.metrics] == [m["test_loss"] for _, m in second.metrics]


def test_early_stopping_ends_the_run_and_still_checkpoints(tmp_path):
    _, logger, summary = run_loop(tmp_path, iterations=40, log_rate=1, early_stop_loss_change=10.0,
                                  sample_at_end=False)  # fmt: skip
    assert summary["stopped_early"] and summary["steps"] == 11  # the 11th log is the first with 10 changes
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == 11


def test_warmup_reaches_the_optimizer(tmp_path):
    _, logger, _ = run_loop(tmp_path, warmup=4, sample_at_end=False)
    assert [m["lr"] for _, m in logger.metrics] == pytest.approx([0.5e-3, 1e-3, 1e-3, 1e-3])
