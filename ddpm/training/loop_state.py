"""What the training loop carries from one step to the next besides weights, optimizer and data position."""

import dataclasses
import math
import time
from typing import Any

import torch

from ddpm.runtime.distributed import Ranks, sum_across_ranks
from ddpm.training.update import StepResult


@dataclasses.dataclass
class LoopState:
    """The step, the running sums since the last log (kept on the device: no host sync per step), early-stopping
    and best-FID bookkeeping. All of it is saved in every checkpoint, so that a resumed run logs exactly what an
    uninterrupted one would."""

    step: int = 0
    loss_sum: torch.Tensor = dataclasses.field(default_factory=lambda: torch.zeros(()))  # since the last log
    grad_norm_sum: torch.Tensor = dataclasses.field(default_factory=lambda: torch.zeros(()))
    good_steps: torch.Tensor = dataclasses.field(default_factory=lambda: torch.zeros((), dtype=torch.long))
    interval_losses: list[float] = dataclasses.field(default_factory=list)  # one per log, for early stopping
    stopped_early: bool = False
    wall_time_s: float = 0.0  # training time of earlier processes of this run
    best_fid: float = math.inf  # trainer.eval_rate: the lowest FID so far (its checkpoint is best.pt)
    evals_since_best: int = 0

    TENSORS = ("loss_sum", "grad_norm_sum", "good_steps")

    def to(self, device: torch.device) -> "LoopState":
        for name in self.TENSORS:
            setattr(self, name, getattr(self, name).to(device))
        return self

    def state_dict(self) -> dict[str, Any]:
        state = dataclasses.asdict(self)
        state.update({name: getattr(self, name).cpu() for name in self.TENSORS})
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """In place; the tensors stay on their device. Keys of other owners (the non-finite policy's) are skipped."""
        for field in dataclasses.fields(self):
            if field.name in state:
                value = state[field.name]
                if field.name in self.TENSORS:
                    value = torch.as_tensor(value).to(getattr(self, field.name).device)
                setattr(self, field.name, list(value) if isinstance(value, list) else value)

    def total_time(self, started: float) -> float:
        """Training time of the whole run: earlier processes', and this one's since `started` (perf_counter)."""
        return self.wall_time_s + time.perf_counter() - started

    def add_step(self, result: StepResult) -> None:
        """Accumulates one step on the device: its loss and gradient norm when the optimizer took it."""
        self.loss_sum += torch.where(result.applied, result.loss, 0.0)
        self.grad_norm_sum += torch.where(result.applied, result.grad_norm, 0.0)
        self.good_steps += result.applied

    def close_interval(self, ranks: Ranks) -> dict[str, float]:
        """The mean train loss and gradient norm since the last log (one host sync; one all-reduce across ranks,
        so every rank gets the same numbers), and a fresh interval."""
        metrics: dict[str, float] = {}
        loss_sum = sum_across_ranks(self.loss_sum.clone(), ranks)
        good_steps = int(self.good_steps.item())
        if good_steps:
            metrics["train_loss"] = loss_sum.item() / (good_steps * ranks.world_size)
            metrics["grad_norm"] = self.grad_norm_sum.item() / good_steps
            self.interval_losses.append(metrics["train_loss"])
        for name in self.TENSORS:
            getattr(self, name).zero_()
        return metrics

    def record_fid(self, fid: float) -> bool:
        """Remembers a FID; whether it is the best so far."""
        improved = fid < self.best_fid
        self.best_fid, self.evals_since_best = (fid, 0) if improved else (self.best_fid, self.evals_since_best + 1)
        return improved
