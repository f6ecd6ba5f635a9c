"""Exponential moving average of a network's weights, used for sampling."""

import copy
from typing import Any

import torch
from torch import nn


class EMA(nn.Module):
    """Holds `module`, a frozen copy of a network whose weights trail the trained ones.

    Every `update_rate`-th call of `update` moves the copy towards the live weights by 1 - decay; before
    `start` calls it copies them outright, so the random initial weights are not averaged in.
    The call counter is a plain int kept in the state dict's extra state: no device sync per step.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, start: int = 2000, update_rate: int = 1):
        super().__init__()
        self.decay = decay
        self.start = start
        self.update_rate = update_rate
        self.num_updates = 0
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Counts one training step and, every `update_rate` steps, folds the live weights in."""
        self.num_updates += 1
        if self.num_updates % self.update_rate:
            return
        averaged = [*self.module.parameters(), *self.module.buffers()]
        live = [*model.parameters(), *model.buffers()]
        if self.num_updates < self.start:
            torch._foreach_copy_(averaged, live)
            return
        pairs = list(zip(averaged, live, strict=True))
        floating = [(a, m) for a, m in pairs if a.is_floating_point()]
        torch._foreach_lerp_([a for a, _ in floating], [m for _, m in floating], 1 - self.decay)
        for a, m in pairs:
            if not a.is_floating_point():  # integer buffers (BatchNorm's batch counter) are copied
                a.copy_(m)

    def get_extra_state(self) -> dict[str, Any]:
        return {"num_updates": self.num_updates}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.num_updates = int(state["num_updates"])
