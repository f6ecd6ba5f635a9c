"""The non-finite policy (`trainer.skip_nonfinite`): a step whose loss or gradient norm is not finite never
reaches the weights (see ddpm.training.update); up to N such steps are skipped and counted, one more stops the run."""

import logging
from typing import Any

import torch

from ddpm.config.errors import NonFiniteError
from ddpm.training.update import StepResult

log = logging.getLogger(__name__)


class NonFinitePolicy:
    """Counts faults on the device at every step (no host sync) and reads the count at `check()`: at logs,
    checkpoints and the end, and after every step whose optimizer has synchronized anyway."""

    def __init__(self, allowed: int, device: torch.device):
        self.allowed = allowed
        self.reported = 0  # faults the host has seen and warned about
        self.faults = torch.zeros((), dtype=torch.long, device=device)
        self.last_fault_step = torch.zeros((), dtype=torch.long, device=device)

    def record(self, result: StepResult, step: int) -> None:
        self.faults += result.fault
        self.last_fault_step.copy_(torch.where(result.fault, step, self.last_fault_step))

    def check(self, last_checkpoint: str) -> None:
        """Warns about faults not reported yet, or raises NonFiniteError once there are more than allowed.
        `last_checkpoint` says where the last intact checkpoint is, for the error."""
        faults = int(self.faults.item())
        if faults == self.reported:
            return
        new, self.reported = faults - self.reported, faults
        step = int(self.last_fault_step.item())
        if faults > self.allowed:
            raise NonFiniteError(
                f"step {step}: the loss or the gradient norm is not finite ({faults} such steps so far). The weights "
                f"were not updated with it; {last_checkpoint}. Lower optimizer.lr, set trainer.warmup or "
                f"trainer.grad_clip, or let trainer.skip_nonfinite=N skip up to N such steps (now {self.allowed})."
            )
        log.warning(
            "%d step(s) up to step %d had a non-finite loss or gradient norm and were skipped (%d of at most %d)",
            new,
            step,
            faults,
            self.allowed,
        )

    def state_dict(self) -> dict[str, Any]:
        """Saved inside the checkpoint's "loop" entry, under the keys it has always had there."""
        return {
            "skipped_nonfinite": self.reported,
            "faults": self.faults.cpu(),
            "last_fault_step": self.last_fault_step.cpu(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reported = int(state.get("skipped_nonfinite", 0))
        self.faults.copy_(torch.as_tensor(state.get("faults", self.reported)))
        self.last_fault_step.copy_(torch.as_tensor(state.get("last_fault_step", 0)))
