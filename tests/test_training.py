"""The loop's pieces: settings checks, warmup, early stopping, checkpoints, and a short real run in-process."""

import math

import pytest
import torch

from ddpm.config.errors import ConfigError, NonFiniteError
from ddpm.data.digits import digits
from ddpm.data.loader import TrainingBatches
from ddpm.diffusion.gaussian import GaussianDiffusion
from ddpm.diffusion.schedules import linear_betas
from ddpm.io.checkpoint import load_checkpoint
from ddpm.io.loggers import LocalLogger
from ddpm.model.ema import EMA
from ddpm.model.unet import UNet
from ddpm.runtime.devices import resolve_device
from ddpm.runtime.fast_paths import FastPaths
from ddpm.runtime.rng import seed_everything
from ddpm.training.loop import learning_rate, should_stop_early, train
from ddpm.training.settings import TrainSettings
from ddpm.training.setup import build_training


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


def test_the_learning_rate_warms_up_linearly_then_stays_or_decays():
    assert learning_rate(0, 1.0, 4) == 0.25
    assert learning_rate(3, 1.0, 4) == 1.0
    assert learning_rate(100, 1.0, 4) == 1.0
    assert learning_rate(0, 2e-4, 0) == 2e-4
    # After the warmup, a decay towards 0 at the last step: half-way is half for both shapes.
    assert learning_rate(4, 1.0, 4, "cosine", 104) == 1.0 and learning_rate(4, 1.0, 4, "linear", 104) == 1.0
    assert learning_rate(54, 1.0, 4, "cosine", 104) == pytest.approx(0.5)
    assert learning_rate(54, 1.0, 4, "linear", 104) == pytest.approx(0.5)
    assert learning_rate(29, 1.0, 4, "cosine", 104) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert learning_rate(104, 1.0, 4, "cosine", 104) == pytest.approx(0.0, abs=1e-12)
    assert learning_rate(200, 1.0, 0, "linear", 100) == 0.0


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


def tiny_diffusion(use_labels=True, null_class=False, dropout=0.1, one_level=False):
    """Two levels (the second attends at 8x8); one_level=True: a single attending level, for tests whose cost
    grows with the graph (compilation)."""
    shape = {"channel_mults": (1,), "attention_resolutions": (0,)} if one_level else {"channel_mults": (1, 2)}
    model = UNet(
        in_channels=1,
        image_size=16,
        base_channels=16,
        num_res_blocks=1,
        num_groups=8,
        **shape,
        use_labels=use_labels,
        num_classes=10,
        dropout=dropout,
        null_class=null_class,
    )
    return GaussianDiffusion(model, linear_betas(50), 16, 1, ema=EMA(model, decay=0.9, start=2))


class RecordingLogger(LocalLogger):
    def __init__(self, run_dir, on_log=None):
        super().__init__(run_dir, {})
        self.metrics, self.images, self.on_log = [], [], on_log

    def log(self, metrics, step):
        self.metrics.append((step, metrics))
        if self.on_log is not None:
            self.on_log(step, metrics)

    def log_image(self, key, path, step, caption=None):
        self.images.append((key, step))


class PoisonedBatches(TrainingBatches):
    """Digits batches, except that the batches of the given (1-based) steps are all NaN."""

    def __init__(self, poisoned_steps=()):
        super().__init__(digits(), 16, num_workers=0, seed=0)
        self.poisoned, self.taken = set(poisoned_steps), 0

    def __next__(self):
        x, y = super().__next__()
        self.taken += 1
        return (torch.full_like(x, float("nan")) if self.taken in self.poisoned else x), y


def run_loop(
    tmp_path,
    resume_from=None,
    poisoned_steps=(),
    diffusion=None,
    evaluator=None,
    fused=False,
    fast=None,
    on_log=None,
    device="cpu",
    **overrides,
):
    seed_everything(0)
    diffusion = diffusion or tiny_diffusion()
    settings = TrainSettings(
        **{
            "iterations": 8,
            "batch_size": 16,
            "use_labels": True,
            "log_rate": 2,
            "checkpoint_rate": 4,
            "sample_rate": 0,
            "grid_columns": 1,
            "device": device,
            "num_workers": 0,
            "test_batches": 1,
            **overrides,
        }
    )
    logger = RecordingLogger(tmp_path, on_log)
    optimizer = torch.optim.Adam(diffusion.model.parameters(), lr=1e-3, fused=fused)
    resume = (resume_from, load_checkpoint(resume_from)) if resume_from else None
    with build_training(
        diffusion,
        optimizer,
        PoisonedBatches(poisoned_steps),
        settings,
        fast=fast or FastPaths(),
        device=torch.device(device),
        run_dir=tmp_path,
        logger=logger,
        config={"note": "test"},
        test_loader=torch.utils.data.DataLoader(digits(split="test"), batch_size=16),
        resume=resume,
        evaluator=evaluator,
    ) as parts:
        summary = train(parts, settings)
    return diffusion, logger, summary


def test_the_loop_logs_checkpoints_and_samples(tmp_path):
    diffusion, logger, summary = run_loop(tmp_path)
    assert [step for step, _ in logger.metrics] == [2, 4, 6, 8]
    assert all({"train_loss", "test_loss", "lr"} <= set(m) for _, m in logger.metrics)
    assert summary["steps"] == 8 and not summary["stopped_early"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "last.pt",
        "step_0000004.pt",
        "step_0000008.pt",
    ]
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
    _, logger, summary = run_loop(tmp_path, iterations=40, log_rate=1, early_stop_loss_change=10.0, sample_at_end=False)
    assert summary["stopped_early"] and summary["steps"] == 11  # the 11th log is the first with 10 changes
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == 11


def test_warmup_reaches_the_optimizer(tmp_path):
    _, logger, _ = run_loop(tmp_path, warmup=4, sample_at_end=False)
    assert [m["lr"] for _, m in logger.metrics] == pytest.approx([0.5e-3, 1e-3, 1e-3, 1e-3])


@pytest.mark.parametrize("fused", [False, True], ids=["for-loop-adam", "fused-adam"])
def test_an_interrupted_loop_resumes_bit_identical(tmp_path, fused):
    """In-process version of tests/test_resume.py: 10 steps, against 6 steps resumed from step 4's checkpoint."""
    uninterrupted, reference, _ = run_loop(tmp_path / "a", iterations=10, log_rate=3, fused=fused)
    run_loop(tmp_path / "b", iterations=6, log_rate=3, fused=fused)
    resumed, logger, summary = run_loop(
        tmp_path / "b",
        iterations=10,
        log_rate=3,
        fused=fused,
        resume_from=tmp_path / "b" / "checkpoints" / "step_0000004.pt",
    )
    assert summary["resumed_from_step"] == 4 and summary["steps"] == 10
    for name, tensor in uninterrupted.state_dict().items():
        if isinstance(tensor, torch.Tensor):
            assert torch.equal(resumed.state_dict()[name], tensor), name
    assert uninterrupted.ema.num_updates == resumed.ema.num_updates == 10
    expected = [(step, m) for step, m in reference.metrics if step > 4]
    assert [step for step, _ in logger.metrics] == [6, 9]
    for (step, got), (_, want) in zip(logger.metrics, expected, strict=True):
        assert {k: got[k] for k in ("train_loss", "test_loss", "grad_norm")} == {
            k: want[k] for k in ("train_loss", "test_loss", "grad_norm")
        }, step


def test_an_fp16_run_resumes_with_its_loss_scale(tmp_path, monkeypatch):
    """The grad scaler's scale and growth count are in the checkpoint. Here the scale doubles after every good
    step, so it reaches overflow (a skipped step, then half the scale) within a few steps: a resumed run that
    started again from the initial scale skipped other steps than the uninterrupted one."""
    from ddpm.training import update

    def doubling_scaler(fast, device):
        return torch.amp.GradScaler(device.type, growth_interval=1, enabled=fast.precision == "fp16")

    monkeypatch.setattr(update, "grad_scaler", doubling_scaler)
    fast = FastPaths(precision="fp16")
    uninterrupted, _, _ = run_loop(tmp_path / "a", iterations=10, fast=fast, fused=True)
    run_loop(tmp_path / "b", iterations=6, fast=fast, fused=True)
    checkpoint = tmp_path / "b" / "checkpoints" / "step_0000004.pt"
    assert load_checkpoint(checkpoint)["scaler"]["scale"] != 2.0**16  # it moved in 4 steps
    resumed, _, _ = run_loop(tmp_path / "b", iterations=10, fast=fast, fused=True, resume_from=checkpoint)
    for name, tensor in uninterrupted.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], tensor), name


@pytest.mark.parametrize("fused", [False, True], ids=["for-loop-to-fused", "fused-to-for-loop"])
def test_a_run_resumes_with_the_configured_optimizer_kernel(tmp_path, fused):
    """load_state_dict took the checkpoint's `fused`: a for-loop checkpoint resumed fused failed at its first
    step (found_inf handed to a for-loop Adam), and a fused one resumed with fused=false stepped fused."""
    run_loop(tmp_path, iterations=4, fused=not fused)
    checkpoint = tmp_path / "checkpoints" / "last.pt"
    _, _, summary = run_loop(tmp_path, iterations=6, fused=fused, resume_from=checkpoint)
    assert summary["steps"] == 6
    state = load_checkpoint(checkpoint)
    assert bool(state["optimizer"]["param_groups"][0].get("fused")) is fused


# A for-loop Adam is checked on the host at every step; a fused one skips on the device and is checked at logs.
ADAM_KINDS = pytest.mark.parametrize("fused", [False, True], ids=["for-loop-adam", "fused-adam"])


@ADAM_KINDS
def test_a_nonfinite_step_stops_the_run_naming_the_step_and_the_last_checkpoint(tmp_path, fused):
    message = (
        r"step 6: the loss (is nan|or the gradient norm is not finite).*last.pt \(step 4\).*trainer.skip_nonfinite"
    )
    with pytest.raises(NonFiniteError, match=message):
        run_loop(tmp_path, poisoned_steps=[6], fused=fused)
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert state["step"] == 4  # the checkpoint on disk is still the last good one
    assert all(torch.isfinite(t).all() for t in state["model"].values())


@ADAM_KINDS
def test_skip_nonfinite_skips_and_counts_up_to_n_steps(tmp_path, fused):
    diffusion, logger, summary = run_loop(tmp_path, poisoned_steps=[3], skip_nonfinite=1, fused=fused)
    assert summary["steps"] == 8 and summary["skipped_nonfinite"] == 1
    assert [m["skipped_nonfinite"] for _, m in logger.metrics] == [0, 1, 1, 1]
    assert all(torch.isfinite(t).all() for t in [*diffusion.model.parameters(), *diffusion.ema.parameters()])
    with pytest.raises(NonFiniteError, match="step 5"):
        run_loop(tmp_path / "again", poisoned_steps=[3, 5], skip_nonfinite=1, fused=fused)


def test_keep_checkpoints_prunes_the_periodic_ones(tmp_path):
    run_loop(tmp_path, iterations=8, checkpoint_rate=2, keep_checkpoints=2, sample_at_end=False)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "last.pt",
        "step_0000006.pt",
        "step_0000008.pt",
    ]


class RandomlyFlipped(torch.utils.data.Dataset):
    """(digit flipped left-right at random through torch's global RNG, as torchvision's transforms do, index)."""

    def __init__(self, size):
        self.images = digits().tensors[0][:size]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        image = self.images[index]
        return (image.flip(-1) if torch.rand(()) < 0.5 else image), index


@pytest.mark.parametrize("num_workers", [0, 2])
def test_batches_restart_at_any_position_with_the_same_order_and_augmentation(num_workers):
    dataset = RandomlyFlipped(size=40)  # 2 full batches of 16 per epoch: the run below crosses epochs
    torch.manual_seed(123)
    before = torch.get_rng_state()
    batches = TrainingBatches(dataset, 16, seed=5, num_workers=num_workers)
    stream = [next(batches) for _ in range(7)]
    assert torch.equal(torch.get_rng_state(), before)  # loading never draws from the caller's stream
    state = batches.state_dict()
    assert (state["epoch"], state["batch"]) == (3, 1)

    fresh = TrainingBatches(dataset, 16, seed=5, num_workers=0)
    fresh.load_state_dict({**state, "epoch": 1, "batch": 1})  # restart at the 4th batch
    for (x, i), (x_again, i_again) in zip(stream[3:], [next(fresh) for _ in range(4)], strict=True):
        assert torch.equal(x, x_again) and torch.equal(i, i_again)
    reference = TrainingBatches(dataset, 16, seed=5, num_workers=0)
    assert all(torch.equal(x, next(reference)[0]) for x, _ in stream)  # workers change nothing


def test_augmentation_differs_between_images_and_epochs():
    dataset = RandomlyFlipped(size=32)
    batches = TrainingBatches(dataset, 32, seed=0)

    def flipped(batch):
        images, indices = batch
        return {int(i): not torch.equal(x, dataset.images[i]) for x, i in zip(images, indices, strict=True)}

    first, second = flipped(next(batches)), flipped(next(batches))  # two epochs of the same 32 images
    assert set(first.values()) == {True, False}  # chance of failing: 2 in 2**32
    assert first != second


class ScriptedFid:
    """Stands in for the FID of tasks/evaluate.py: returns the given values in turn, remembering the weights."""

    description = "scripted values"

    def __init__(self, values):
        self.values, self.calls = list(values), []

    def __call__(self, diffusion):
        self.calls.append({k: v.clone() for k, v in diffusion.model.state_dict().items()})
        return self.values[len(self.calls) - 1]


def test_the_best_fid_is_kept_as_best_pt_and_can_stop_the_run(tmp_path):
    fid = ScriptedFid([5.0, 3.0, 4.0, 4.0, 1.0])
    _, logger, summary = run_loop(
        tmp_path,
        iterations=12,
        eval_rate=2,
        early_stop_metric="fid",
        early_stop_patience=2,
        evaluator=fid,
        sample_at_end=False,
    )
    assert summary["steps"] == 8 and summary["stopped_early"]  # evaluations at 2, 4 (best), 6, 8: two without gain
    assert summary["best_fid"] == 3.0
    best = load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    assert best["step"] == 4 and best["loop"]["best_fid"] == 3.0
    for name, tensor in fid.calls[1].items():  # best.pt holds the weights that were measured
        assert torch.equal(best["model"][name], tensor)
    logged = [(step, m["fid"], m["best_fid"]) for step, m in logger.metrics if "fid" in m]
    assert logged == [(2, 5.0, 5.0), (4, 3.0, 3.0), (6, 4.0, 3.0), (8, 4.0, 3.0)]


def test_fid_early_stopping_needs_evaluations():
    with pytest.raises(ConfigError, match="trainer.early_stop_metric=fid compares FIDs"):
        TrainSettings(early_stop_metric="fid")
    with pytest.raises(ConfigError, match="trainer.early_stop_metric='fidd'"):
        TrainSettings(early_stop_metric="fidd")


def test_a_stop_signal_during_the_final_grid_ends_the_run_unfinished_and_the_same_command_finishes_it(
    tmp_path, monkeypatch, caplog
):
    """It logged "stopping after this step", drew the grid anyway and ended as finished (exit status 0)."""
    import os
    import signal

    from ddpm.training.grids import SampleGrids
    from ddpm.training.preemption import Preempted

    draw = SampleGrids.final

    def interrupted(self, step):
        os.kill(os.getpid(), signal.SIGTERM)  # delivered here, in the main thread, before the drawing
        return draw(self, step)

    monkeypatch.setattr(SampleGrids, "final", interrupted)
    with pytest.raises(Preempted) as stopped, caplog.at_level("WARNING"):
        run_loop(tmp_path, iterations=4, sample_at_end=True)
    assert stopped.value.code == 143
    assert "received SIGTERM during the final grid: stopping now; the checkpoint of step 4 is written" in caplog.text
    assert not list(tmp_path.glob("samples/final*.png"))
    monkeypatch.setattr(SampleGrids, "final", draw)
    _, _, summary = run_loop(
        tmp_path, iterations=4, sample_at_end=True, resume_from=tmp_path / "checkpoints" / "last.pt"
    )
    assert summary["steps"] == 4 and summary["resumed_from_step"] == 4 and summary["sample_grid"]
