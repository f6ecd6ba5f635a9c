"""One update of the weights: loss -> gradients -> clipped -> an optimizer step that a non-finite loss or gradient
never reaches -> EMA. The training loop, task=benchmark and experiments/compare_diffusers.py all step with it.
"""

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from ddpm.runtime.fast_paths import FastPaths, autocast, grad_scaler


def optimizer_skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether a non-finite step is skipped on the device, so that no host sync is needed to decide it: an
    `optimizer.step` that honours a `found_inf` tensor (the fused Adam/AdamW/SGD kernels) does that. fp16's grad
    scaler skips an overflowing step by itself, but for any other optimizer it reads `found_inf` on the host."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and all(
        group.get("fused") for group in optimizer.param_groups
    )


def step_unless_nonfinite(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, finite: torch.Tensor) -> None:
    """optimizer.step(), skipped when `finite` (a device bool) is false, without reading it on the host.

    fp16's scaler skips steps whose gradients overflowed by itself. Otherwise a fused optimizer reads
    `found_inf` (the attribute torch.amp.GradScaler sets for it) and leaves weights, moments and step count as
    they were.
    """
    if scaler.is_enabled():
        scaler.step(optimizer)
        scaler.update()
        return
    optimizer.grad_scale = None
    optimizer.found_inf = (~finite).float()
    optimizer.step()


@dataclasses.dataclass
class StepResult:
    """What one update leaves on the device (nothing here has been read on the host)."""

    loss: torch.Tensor  # the batch's mean loss, detached
    grad_norm: torch.Tensor  # the global gradient norm before clipping
    applied: torch.Tensor  # bool: the optimizer took the step
    fault: torch.Tensor  # bool: a non-finite loss (or gradient norm) that counts against trainer.skip_nonfinite


class UpdateStep:
    """`step(x, labels, t, noise)`: one guarded optimizer step of `loss_module` (called as
    `loss_module(x, labels, t, noise)` -> mean loss) under the chosen precision, then the EMA update.

    With a fused optimizer a non-finite step is skipped on the device, with no host sync; a for-loop optimizer
    cannot skip there, so its step reads `finite` on the host (or fp16's grad scaler reads its `found_inf`): one
    sync per step, after which the loop reports a fault at once.
    """

    def __init__(
        self,
        loss_module: nn.Module,
        optimizer: torch.optim.Optimizer,
        update_ema: Callable[[], None],
        *,
        fast: FastPaths,
        device: torch.device,
        max_grad_norm: float,
    ):
        self.loss_module, self.optimizer, self.update_ema = loss_module, optimizer, update_ema
        self.precision, self.device, self.max_grad_norm = fast.precision, device, max_grad_norm
        self.scaler = grad_scaler(fast, device)
        self.skips_on_device = optimizer_skips_on_device(optimizer)
        self.parameters = [p for group in optimizer.param_groups for p in group["params"]]

    def __call__(
        self, x: torch.Tensor, labels: torch.Tensor | None, t: torch.Tensor, noise: torch.Tensor
    ) -> StepResult:
        with autocast(self.precision, self.device):
            loss = self.loss_module(x, labels, t, noise)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)  # clip the true gradients (a no-op unless fp16)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters, self.max_grad_norm, foreach=True)
        # The gradients (so their norm) are the same on every rank, so every rank decides alike.
        finite = torch.isfinite(loss.detach() + grad_norm)
        if self.skips_on_device or self.scaler.is_enabled():  # the scaler syncs for a for-loop optimizer
            step_unless_nonfinite(self.optimizer, self.scaler, finite)
        elif bool(finite):  # the one host sync of a for-loop optimizer
            self.optimizer.step()
        # The EMA counts every step, skipped or not. A skipped step leaves the weights as they were, so folding
        # them in once more is what the weights did at that step; and ema_start / ema_update_rate, which are set
        # in optimizer steps, stay aligned with the loop's step, with no host sync to decide anything.
        self.update_ema()
        # Under fp16 an overflowing gradient is the scaler's business (it lowers the scale and skips the step):
        # only a non-finite loss is a fault.
        fault = ~torch.isfinite(loss.detach()) if self.scaler.is_enabled() else ~finite
        return StepResult(loss.detach(), grad_norm, finite, fault)
