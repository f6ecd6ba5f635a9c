"""Stopping at a step boundary when asked: SLURM (through submitit) sends SIGUSR2 some time before a job's time
limit or on preemption; clusters send SIGTERM before they kill a job; a user presses Ctrl-C (SIGINT).

The signal only sets a flag. The loop looks at it between steps, writes a checkpoint there (never in the middle
of a step or of a write), and then ends the run. After SIGUSR2 inside submitit, submitit's own handler requeues
the job with the same arguments, and the requeued job continues from the checkpoint (`trainer.resume=auto`).
Otherwise the process exits with 128 + the signal's number (130 for SIGINT, 143 for SIGTERM, as a shell reports
a process the signal ended) and one line saying where the checkpoint is; the same command continues the run.
A second SIGTERM or SIGINT stops at once, keeping the checkpoints already written.
"""

import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ddpm.runtime.distributed import Ranks

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)


class Preempted(SystemExit):
    """The run stopped because it was asked to; exit status 128 + the signal's number."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)


class StopSignal:
    """Catches the stop signals from construction until `close()`; `received` is the first that came."""

    def __init__(self, signums: tuple[int, ...] = STOP_SIGNALS):
        self.received: int | None = None
        self._at_once: str | None = None  # while set, a signal ends the process at once (see `at_once`)
        self._previous: dict[int, Callable | int | None] = {}
        if threading.current_thread() is threading.main_thread():  # signals can only be caught there
            self._previous = {signum: signal.signal(signum, self._note) for signum in signums}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _note(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.received is not None and signum != signal.SIGUSR2:
            log.warning("received %s again: stopping now; the checkpoints written so far are kept", name)
            raise Preempted(signum)
        self.received = signum
        if self._at_once is not None:
            log.warning("received %s %s", name, self._at_once)
            raise Preempted(signum)
        log.warning("received %s: stopping after this step, with a checkpoint", name)

    @contextlib.contextmanager
    def at_once(self, what: str) -> Iterator[None]:
        """Inside, a stop signal (or one received before) ends the process at once, logging "received SIGNAL
        `what`": for work after the last checkpoint that the next run of the command does again."""
        if self.received is not None:
            log.warning("received %s %s", signal.Signals(self.received).name, what)
            raise Preempted(self.received)
        self._at_once = what
        try:
            yield
        finally:
            self._at_once = None

    def close(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def hand_over(self, step: int, checkpoint: Path) -> None:
        """After the checkpoint: SIGUSR2 inside submitit goes to submitit's handler, which requeues the job (and
        exits on rank 0); then, or otherwise, this process ends."""
        signum = self.received or signal.SIGUSR2
        previous = self._previous.get(signum)
        self.close()
        name = signal.Signals(signum).name
        if signum == signal.SIGUSR2 and callable(previous):
            previous(signum, None)  # rank 0 requeues and exits; other ranks return here
        log.warning(
            "stopped at step %d by %s; the checkpoint is %s: run the same command to continue from it "
            "(trainer.resume=auto)",
            step,
            name,
            checkpoint,
        )
        raise Preempted(signum)


@contextlib.contextmanager
def stop_signals_end_at_once(what: str) -> Iterator[None]:
    """For a task without steps to finish (sampling, evaluation): inside, SIGTERM, SIGINT or SIGUSR2 ends the
    process at once with one line, "received SIGNAL `what`", and exit status 128 + the signal's number."""
    stop_signal = StopSignal()
    try:
        with stop_signal.at_once(what):
            yield
    finally:
        stop_signal.close()


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
