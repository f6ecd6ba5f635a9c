"""The settings of the training loop: the `trainer` config group (conf/trainer/default.yaml)."""

import dataclasses
import math
from typing import ClassVar

import torch

from ddpm.config.errors import ConfigError
from ddpm.config.validation import Validated, at_least, fraction, one_of, seed_value
from ddpm.runtime.cpu_share import cpu_share, data_workers
from ddpm.runtime.fast_paths import FastPaths, resolve_fast_paths

OFF = "0 turns it off"
# The run's result that training returns (to a Hydra sweeper such as Optuna's), all to be minimized.
OBJECTIVES = ("auto", "test_loss", "train_loss", "best_fid", "nll_bits_per_dim")


@dataclasses.dataclass
class TrainSettings(Validated):
    """Settings of the loop; every rate counts optimizer steps and 0 turns it off."""

    SECTION: ClassVar[str] = "trainer"

    iterations: int = at_least(1, 800_000)
    batch_size: int = at_least(1, 256)  # the global batch, shared by the ranks
    loss_type: str = one_of(("l1", "l2"), "l2")  # read by the diffusion; listed here as a choice about training
    use_labels: bool = False  # class-conditional training; read by the model too
    grad_clip: float = at_least(0, 1.0, note=OFF)  # max global gradient norm
    warmup: int = at_least(0, 0, note=OFF)  # linear learning-rate warmup steps
    lr_decay: str = one_of(("constant", "cosine", "linear"), "constant")  # after warmup, towards 0 at `iterations`
    log_rate: int = at_least(0, 100, note=OFF)
    test_batches: int = at_least(0, 10, note="0 = the whole split")  # test-split batches per test-loss estimate
    sample_rate: int = at_least(0, 10_000, note=OFF)
    checkpoint_rate: int = at_least(0, 10_000, note=OFF)
    early_stop_loss_change: float = at_least(0, 0.0, note=OFF)
    ema_decay: float = fraction(0.9999)
    ema_update_rate: int = at_least(1, 1)
    ema_start: int = at_least(0, 1)
    use_ema: bool = True
    device: str = "auto"
    seed: int = seed_value()
    num_workers: int | None = at_least(0, None, note="null = by device (ddpm.runtime.cpu_share.data_workers)")
    num_threads: int | None = at_least(1, None, note="null = this process's share of its CPUs")
    grid_columns: int = at_least(1, 10)  # sample grids: columns x columns images, or one row of this many per class
    sample_at_end: bool = True
    label_dropout: float = fraction(0.0)  # classifier-free guidance: the share of labels replaced by the null label
    eval_rate: int = at_least(0, 0, note=OFF)  # steps between cheap FIDs of the EMA weights (keeps best.pt)
    eval_samples: int = at_least(1, 5000)  # images per cheap FID
    eval_steps: int = at_least(1, 50)  # DDIM steps per image of a cheap FID
    eval_batch_size: int = at_least(1, 250)  # images per sampling batch of a cheap FID
    nll_at_end: bool = False  # the variational bound in bits/dim on the test split after the last step
    nll_timesteps: int | None = at_least(1, None, note="KL terms of the end-of-run bound; null = all, the exact bound")
    objective: str = one_of(OBJECTIVES, "auto")  # what the task returns to a sweeper: see objective_name
    early_stop_metric: str = one_of(("train_loss", "fid"), "train_loss")
    early_stop_patience: int = at_least(1, 5)  # with early_stop_metric=fid: evaluations without a new best FID
    resume: str = "auto"  # auto (continue from <run dir>/checkpoints when there is one) | never | PATH
    keep_checkpoints: int = at_least(0, 5, note="0 keeps all")  # periodic checkpoints kept besides last.pt
    skip_nonfinite: int = at_least(0, 0)  # steps with a non-finite loss or gradient norm that may be skipped
    deterministic: bool = False  # deterministic kernels only (exact resume on GPU; slower)
    precision: str = "auto"  # auto (bf16 where the GPU or CPU has bf16 units, else fp32) | fp32 | bf16 | fp16
    channels_last: bool | None = None  # NHWC layout; None = on CUDA
    compile: bool | None = None  # torch.compile the network; None = on CUDA
    data_on_device: bool | None = None  # the training split as one tensor on the device; None = on CUDA

    def check(self) -> None:
        if self.objective == "best_fid" and self.eval_rate == 0:
            raise ConfigError("trainer.objective=best_fid is the best FID during training: set trainer.eval_rate > 0")
        if self.objective == "nll_bits_per_dim" and not self.nll_at_end:
            raise ConfigError(
                "trainer.objective=nll_bits_per_dim is the bound after the last step: set trainer.nll_at_end=true"
            )
        if self.early_stop_metric == "fid" and self.eval_rate == 0:
            raise ConfigError("trainer.early_stop_metric=fid compares FIDs: set trainer.eval_rate > 0")
        if self.label_dropout > 0 and not self.use_labels:
            raise ConfigError(
                f"trainer.label_dropout={self.label_dropout} drops class labels: it needs trainer.use_labels=true"
            )
        if not self.resume.strip():
            raise ConfigError("trainer.resume='' must be auto, never or the path of a checkpoint")
        if self.early_stop_loss_change > 0 and self.log_rate == 0:
            raise ConfigError("trainer.early_stop_loss_change > 0 compares logged losses: set trainer.log_rate > 0")

    def check_measurements(self, *, start_step: int, has_test_split: bool, in_search: bool) -> str | None:
        """Refuses, before the first step, an objective or end-of-run measurement that this run cannot produce
        from `start_step` on with its rates, iterations and data (it trained, then reported None). Returns a
        warning instead where trainer.objective=auto outside a search (nobody reads the value there)."""
        if self.nll_at_end and not has_test_split:
            raise ConfigError(
                "trainer.nll_at_end=true measures the bound on the test split, but the dataset has none: set it false"
            )
        name, explicit = self.resolved_objective(has_test_split), self.objective != "auto"
        key = f"trainer.objective={name}" if explicit else f"trainer.objective=auto ({name})"
        problem = None
        if name in ("test_loss", "nll_bits_per_dim") and not has_test_split:
            problem = f"{key} is measured on the test split, but the dataset has none: choose train_loss"
        elif name in ("test_loss", "train_loss") and not self._happens(self.log_rate, start_step):
            problem = (
                f"{key} is the {name.replace('_', ' ')} at the last log, but no step in {start_step + 1}.."
                f"{self.iterations} logs (trainer.log_rate={self.log_rate}, trainer.iterations={self.iterations}): "
                "set trainer.log_rate to divide a step in that range"
            )
        elif name == "best_fid" and not self._happens(self.eval_rate, 0):
            problem = (
                f"{key} is the best FID during training, but no step up to trainer.iterations={self.iterations} "
                f"measures one (trainer.eval_rate={self.eval_rate}): set trainer.eval_rate <= trainer.iterations"
            )
        if problem and (explicit or in_search):
            raise ConfigError(problem)
        return problem

    def _happens(self, rate: int, after: int) -> bool:
        """Whether some step in after+1..iterations is a multiple of `rate` (0 = never)."""
        return rate > 0 and self.iterations // rate > after // rate

    @property
    def objective_name(self) -> str:
        """trainer.objective, with auto resolved for a dataset with a test split."""
        return self.resolved_objective(has_test_split=True)

    def resolved_objective(self, has_test_split: bool) -> str:
        """trainer.objective, with auto resolved: the best FID when FID is measured during training, else the
        final test loss, or the train loss where the dataset has no test split."""
        if self.objective != "auto":
            return self.objective
        if self.eval_rate > 0:
            return "best_fid"
        return "test_loss" if has_test_split else "train_loss"

    @property
    def max_grad_norm(self) -> float:
        """The clipping threshold; inf (measure the norm, never clip) when grad_clip is 0."""
        return self.grad_clip if self.grad_clip > 0 else math.inf

    def data_workers(self, device: torch.device) -> int:
        """trainer.num_workers, or for null the device's choice given this process's CPU share."""
        return data_workers(self.num_workers, device, cpu_share(self.num_threads))

    def fast_paths(self, device: torch.device) -> FastPaths:
        """The speed switches resolved for `device` (auto/null -> that device's default)."""
        return resolve_fast_paths(
            device=device,
            precision=self.precision,
            channels_last=self.channels_last,
            compile=self.compile,
            data_on_device=self.data_on_device,
        )
