"""Stopping at a step boundary when the cluster asks: SLURM (through submitit) sends SIGUSR2 some time before a
job's time limit or on preemption.

The signal only sets a flag. The loop looks at it between steps, writes a checkpoint there (never in the middle
of a step or of a write), and then hands over to submitit's own handler, which requeues the job with the same
arguments; the requeued job continues from the checkpoint (`trainer.resume=auto`). Outside submitit the run
just ends after the checkpoint, and the same command continues it.
"""

import logging
import signal
import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from ddpm.distributed import Ranks

log = logging.getLogger(__name__)


class Preempted(SystemExit):
    """The run stopped at a step boundary because it was asked to; its checkpoint is on disk."""


class StopSignal:
    """Catches `signum` from construction until `close()`; `requested` tells whether it came."""

    def __init__(self, signum: int = signal.SIGUSR2):
        self.signum = signum
        self.requested = False
        self._previous: Callable | int | None = None
        if threading.current_thread() is threading.main_thread():  # signals can only be caught there
            self._previous = signal.signal(signum, self._note)

    def _note(self, signum: int, frame: Any) -> None:
        self.requested = True
        log.warning("received %s: stopping after this step, with a checkpoint", signal.Signals(signum).name)

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None

    def hand_over(self, step: int) -> None:
        """After the checkpoint: submitit's handler requeues the job and exits; otherwise this process ends."""
        previous, self._previous = self._previous, None
        signal.signal(self.signum, previous if previous is not None else signal.SIG_DFL)
        if callable(previous):
            previous(self.signum, None)  # rank 0 requeues and exits; other ranks return here
        raise Preempted(f"stopped at step {step} by {signal.Signals(self.signum).name}; the checkpoint is saved")


class StopAgreement:
    """Whether any rank has been asked to stop, known to every rank at the same step, with no host-device sync
    per step: each call starts a non-blocking all-reduce of this rank's flag (CPU tensors, on a gloo group of
    its own, whatever the training backend) and reads the one started a call earlier. All ranks therefore stop
    at the same step, one step after the first of them got the signal. One process reads its flag directly."""

    def __init__(self, signal: StopSignal, ranks: Ranks):
        self.signal, self.ranks = signal, ranks
        self.group = dist.new_group(backend="gloo") if ranks.distributed else None
        self.flag = torch.zeros(1)
        self.pending: dist.Work | None = None

    def __call__(self) -> bool:
        if not self.ranks.distributed:
            return self.signal.requested
        agreed = False
        if self.pending is not None:
            self.pending.wait()  # started a step ago: long done
            agreed = bool(self.flag.item() > 0)
        self.flag = torch.tensor([float(self.signal.requested)])
        self.pending = dist.all_reduce(self.flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        return agreed

    def close(self) -> None:
        """Waits for the last all-reduce, so that the process group can be taken down."""
        if self.pending is not None:
            self.pending.wait()
            self.pending = None
