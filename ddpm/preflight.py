"""Checks made before the first training step, so that a run fails in seconds rather than hours in."""

import logging
import os
import shutil
import tempfile
from pathlib import Path

from torch import nn

from ddpm.errors import StorageError

log = logging.getLogger(__name__)
MB = 1 << 20


def estimated_checkpoint_bytes(model: nn.Module, with_ema: bool) -> int:
    """Weights, their EMA copy and Adam's two moments (the largest common optimizer state), plus slack."""
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return weights * (3 + int(with_ema)) + MB


def check_storage(directory: Path, checkpoint_bytes: int, keep: int) -> None:
    """The checkpoint directory can be created and written, and its disk holds at least two checkpoints (the
    one being written beside the last). Raises StorageError naming the directory otherwise."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=directory, prefix=".write-test.", suffix=".tmp")
        try:
            os.write(handle, b"\0" * 4096)
            os.fsync(handle)
        finally:
            os.close(handle)
            os.unlink(probe)
    except OSError as error:
        raise StorageError(
            f"the run directory cannot be written: {directory} ({error.strerror or error}). Point hydra.run.dir "
            "(or paths.output_dir) at a writable disk."
        ) from error
    free = shutil.disk_usage(directory).free
    if free < 2 * checkpoint_bytes:
        raise StorageError(
            f"the disk of {directory} has {free / MB:.0f} MB free, but a checkpoint takes about "
            f"{checkpoint_bytes / MB:.0f} MB and two must fit while one is written. Free space, or point "
            "hydra.run.dir (or paths.output_dir) at another disk."
        )
    if keep and free < (keep + 2) * checkpoint_bytes:
        log.warning("the disk of %s has %.0f MB free: not enough for the %d periodic checkpoints "
                    "trainer.keep_checkpoints keeps (about %.0f MB each)", directory, free / MB, keep, checkpoint_bytes / MB)
