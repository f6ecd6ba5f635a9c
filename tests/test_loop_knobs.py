"""The training loop's knobs, each seen where it lands: the learning rate the optimizer steps with (trainer.warmup,
trainer.lr_decay, optimizer.lr), the gradient it steps with (trainer.grad_clip), the timesteps, noise and dropped
labels the diffusion's loss receives (trainer.seed, trainer.label_dropout) and the EMA weights (trainer.ema_decay,
ema_start, ema_update_rate).

The functions behind them (learning_rate, clipping, the noise stream, the EMA) are tested on their own elsewhere;
nothing there notices when the loop stops handing a setting on. So these tests run main.py in this process, as a
user's command does, and watch the parts the loop was built with: a setting that no longer reaches its destination
changes what is seen here.
"""

import dataclasses
import inspect
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY_QUICKSTART
from main_in_process import command, run_in_process

import ddpm.tasks.train as train_task
from ddpm.runtime.distributed import Ranks
from ddpm.training.noise_stream import GlobalBatchNoise
from ddpm.training.setup import TrainingParts

BATCH = 4
# A few steps of the tiny quickstart, on fp32 (exact comparisons), with nothing between the steps but the steps:
# no logs, test losses, periodic checkpoints or grids. No warmup or decay unless a test asks for them, so that the
# weights move by the full learning rate from the first step.
RUN = [
    *TINY_QUICKSTART,
    "schedule.num_timesteps=50",
    f"trainer.batch_size={BATCH}",
    "trainer.log_rate=0",
    "trainer.checkpoint_rate=0",
    "trainer.sample_at_end=false",
    "trainer.num_workers=0",
    "trainer.num_threads=1",
    "trainer.precision=fp32",
    "trainer.warmup=0",
    "trainer.lr_decay=constant",
]


@dataclasses.dataclass
class Watched:
    """What a run's training steps handed on, recorded where it landed."""

    lrs: list[list[float]] = dataclasses.field(default_factory=list)  # each group's lr as optimizer.step() ran
    stepped_norms: list[float] = dataclasses.field(default_factory=list)  # global gradient norm optimizer.step() saw
    reported_norms: list[float] = dataclasses.field(default_factory=list)  # the norm before clipping, as reported
    batches: list[tuple[torch.Tensor, torch.Tensor]] = dataclasses.field(default_factory=list)  # from the data
    losses: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # the arguments of the diffusion's loss
    weights: list[list[torch.Tensor]] = dataclasses.field(default_factory=list)  # the network after each step
    ema_before: list[torch.Tensor] = dataclasses.field(default_factory=list)  # the EMA copy as the loop started
    ema_after: list[torch.Tensor] = dataclasses.field(default_factory=list)
    parts: TrainingParts | None = None


def tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """A copy of a module's weights and buffers, in the order the EMA pairs them."""
    return [tensor.detach().clone() for tensor in [*module.parameters(), *module.buffers()]]


def global_norm(parameters: list[torch.Tensor]) -> float:
    norms = [torch.linalg.vector_norm(p.grad.double()) for p in parameters if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)).item()


class RecordedBatches:
    """The loop's batches, each kept as it is taken."""

    def __init__(self, batches, into: list):
        self.batches, self.into = batches, into

    def __iter__(self):
        return self

    def __next__(self):
        x, y = next(self.batches)
        self.into.append((x.clone(), y.clone()))
        return x, y


def watch(parts: TrainingParts, seen: Watched) -> None:
    """Hooks on the parts the loop is about to run: the optimizer's step (before: lr and gradient; after: the
    weights), the update step's report, the batches and the diffusion's loss."""
    seen.parts = parts
    optimizer, model = parts.update.optimizer, parts.diffusion.model
    parameters = [p for group in optimizer.param_groups for p in group["params"]]

    def before_step(optimizer, args, kwargs):
        seen.lrs.append([group["lr"] for group in optimizer.param_groups])
        seen.stepped_norms.append(global_norm(parameters))

    def after_step(optimizer, args, kwargs):
        seen.weights.append(tensors(model))

    optimizer.register_step_pre_hook(before_step)
    optimizer.register_step_post_hook(after_step)

    add_step = parts.loop.add_step

    def recording_add_step(result):
        seen.reported_norms.append(float(result.grad_norm))
        add_step(result)

    parts.loop.add_step = recording_add_step
    parts.batches = RecordedBatches(parts.batches, seen.batches)

    losses = parts.diffusion.losses
    signature = inspect.signature(losses)

    def recording_losses(*args, **kwargs):
        received = signature.bind(*args, **kwargs).arguments
        seen.losses.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in received.items()})
        return losses(*args, **kwargs)

    parts.diffusion.losses = recording_losses
    seen.ema_before = tensors(parts.diffusion.ema.module)


def watch_training(run_dir: Path, *overrides: str) -> Watched:
    """`python main.py RUN OVERRIDES` in this process, its training loop watched (see `watch`)."""
    seen = Watched()
    loop_train = train_task.train

    def watched_train(parts, settings):
        watch(parts, seen)
        summary = loop_train(parts, settings)
        seen.ema_after = tensors(parts.diffusion.ema.module)
        return summary

    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(train_task, "train", watched_train)
        run_in_process(*command(RUN, [*overrides, f"hydra.run.dir={run_dir}"], {}))
    assert seen.parts is not None, "the training task did not run its loop through ddpm.tasks.train.train"
    return seen


def scheduled_lr(step: int, base: float, warmup: int, decay: str, iterations: int) -> float:
    """The schedule conf/trainer/default.yaml describes, written out independently of the loop's learning_rate:
    linear warmup over `warmup` steps, then constant, or a half cosine or a line from base to 0 at `iterations`."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / (iterations - warmup)
    return base * {"constant": 1.0, "cosine": (1 + math.cos(math.pi * progress)) / 2, "linear": 1 - progress}[decay]


@pytest.mark.parametrize(
    "warmup, decay",
    [(2, "cosine"), (0, "cosine"), (0, "linear"), (2, "linear"), (3, "constant")],
    ids=["warmup-then-cosine", "cosine", "linear", "warmup-then-linear", "warmup-then-constant"],
)
def test_every_optimizer_step_runs_at_the_scheduled_learning_rate(tmp_path, warmup, decay):
    """The lr of each param group as optimizer.step() runs, at every step: what the weights were moved with, not
    what learning_rate() computes or what a log shows now and then."""
    iterations, base = 6, 4e-3
    seen = watch_training(
        tmp_path,
        f"trainer.iterations={iterations}",
        f"trainer.warmup={warmup}",
        f"trainer.lr_decay={decay}",
        f"optimizer.lr={base}",
    )
    expected = [scheduled_lr(step, base, warmup, decay, iterations) for step in range(iterations)]
    assert len(seen.lrs) == iterations
    for step, (lrs, lr) in enumerate(zip(seen.lrs, expected, strict=True)):
        assert lrs == pytest.approx([lr] * len(lrs), rel=1e-12), f"step {step}"
    if decay != "constant":  # the run ends on the way down, not at the base rate
        assert seen.lrs[-1][0] < base / 2


@pytest.mark.parametrize("grad_clip", [1e-3, 0.0], ids=["tiny-clip", "clip-off"])
def test_the_optimizer_steps_with_the_gradient_clipped_to_grad_clip(tmp_path, grad_clip):
    """The gradient's global norm as optimizer.step() runs, against the norm the update step reported before
    clipping (what the logs' grad_norm shows)."""
    seen = watch_training(tmp_path, "trainer.iterations=3", f"trainer.grad_clip={grad_clip}")
    assert len(seen.stepped_norms) == len(seen.reported_norms) == 3
    for reported, stepped in zip(seen.reported_norms, seen.stepped_norms, strict=True):
        if grad_clip:
            assert reported > 10 * grad_clip  # the clip had something to cut
            # clip_grad_norm_ scales by grad_clip / (norm + 1e-6): the clipped norm is grad_clip to 1e-5.
            assert stepped == pytest.approx(grad_clip, rel=1e-4)
        else:  # 0 turns clipping off: the optimizer gets the gradient as computed
            assert stepped == pytest.approx(reported, rel=1e-5)


def test_the_loss_gets_the_timesteps_noise_and_dropped_labels_of_the_seeded_noise_stream(tmp_path):
    """The loop draws t, noise and the dropped labels from GlobalBatchNoise seeded with trainer.seed (not from the
    global generator, and not inside the loss): each run's loss sees exactly that stream, so the seed alone decides
    the draws, and another seed draws others."""
    dropout, steps = 0.5, 3
    runs = {
        seed: watch_training(
            tmp_path / str(seed),
            f"trainer.iterations={steps}",
            f"trainer.seed={seed}",
            f"trainer.label_dropout={dropout}",
        )
        for seed in (7, 8)
    }
    for seed, seen in runs.items():
        stream = GlobalBatchNoise(
            seen.parts.diffusion,
            seed=seed,
            local_batch=BATCH,
            ranks=Ranks(),
            device=torch.device("cpu"),
            label_dropout=dropout,
        )
        assert len(seen.losses) == len(seen.batches) == steps
        for step, ((x, y), received) in enumerate(zip(seen.batches, seen.losses, strict=True)):
            t, noise, labels = stream.draw(y)
            assert torch.equal(received["x0"], x), f"seed {seed}, step {step}: images"
            assert received.get("t") is not None and torch.equal(received["t"], t), f"seed {seed}, step {step}: t"
            assert received.get("noise") is not None and torch.equal(received["noise"], noise), f"step {step}: noise"
            assert torch.equal(received["y"], labels), f"seed {seed}, step {step}: labels"
        dropped = torch.cat([received["y"] for received in seen.losses]) == seen.parts.diffusion.model.null_label
        assert 0 < int(dropped.sum()) < dropped.numel(), f"label_dropout={dropout} dropped none or all labels"
    assert not torch.equal(runs[7].losses[0]["t"], runs[8].losses[0]["t"])
    assert not torch.equal(runs[7].losses[0]["noise"], runs[8].losses[0]["noise"])


@pytest.mark.parametrize(
    "decay, start, rate",
    [(0.9, 3, 1), (0.5, 0, 2)],
    ids=["decay-0.9-copies-before-step-3", "decay-0.5-every-2nd-step-from-the-first"],
)
def test_the_ema_weights_are_the_configured_average_of_the_weights_after_each_step(tmp_path, decay, start, rate):
    """EMA.update's rule applied by hand to the weights after each optimizer step: every `rate`-th step, a copy
    before step `start`, else a move of 1 - decay towards the weights. With the quickstart's own values (decay
    0.995, start 200) or the defaults in place of the configured ones, the result differs."""
    iterations = 6
    seen = watch_training(
        tmp_path,
        f"trainer.iterations={iterations}",
        f"trainer.ema_decay={decay}",
        f"trainer.ema_start={start}",
        f"trainer.ema_update_rate={rate}",
        "optimizer.lr=1e-2",  # large steps: the averages of different settings lie far apart
    )
    assert len(seen.weights) == iterations
    expected = seen.ema_before
    for step, live in enumerate(seen.weights, start=1):
        if step % rate:
            continue
        expected = [
            w.clone() if step < start or not w.is_floating_point() else torch.lerp(a, w, 1 - decay)
            for a, w in zip(expected, live, strict=True)
        ]
    assert len(seen.ema_after) == len(expected)
    for index, (ema, want) in enumerate(zip(seen.ema_after, expected, strict=True)):
        torch.testing.assert_close(ema, want, rtol=1e-6, atol=1e-7, msg=lambda m, i=index: f"tensor {i}: {m}")
    # The average trails the weights: it is not a copy of the last ones.
    assert any(not torch.equal(ema, w) for ema, w in zip(seen.ema_after, seen.weights[-1], strict=True))
