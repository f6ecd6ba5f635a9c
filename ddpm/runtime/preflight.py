"""Checks made before the first training step, so that a run fails in seconds rather than hours in."""

import logging
import os
import shutil
import tempfile
from pathlib import Path

from torch import nn

from ddpm.config.errors import StorageError

log = logging.getLogger(__name__)
MB = 1 << 20
# What a run needs before its checkpoints: Hydra's files, the log, metrics and sample grids.
MIN_FREE_BYTES = 8 * MB
ELSEWHERE = "point hydra.run.dir (or paths.output_dir) at"


def estimated_checkpoint_bytes(model: nn.Module, with_ema: bool) -> int:
    """Weights, their EMA copy and Adam's two moments (the largest common optimizer state), plus slack."""
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return weights * (3 + int(with_ema)) + MB


def check_name_lengths(path: Path, label: str) -> None:
    """Every name in `path` fits the file system (most allow 255 bytes per name): a longer one fails only when
    something is written there, with an error about a file."""
    existing = next((parent for parent in (path, *path.parents) if _exists(parent)), Path("/"))
    limit = os.pathconf(existing, "PC_NAME_MAX") if existing.is_dir() else 255
    for name in path.parts:
        if len(os.fsencode(name)) > limit:
            raise StorageError(
                f"{label}: the name {name[:24]}... is {len(os.fsencode(name))} bytes long, more than the "
                f"{limit} the file system allows: choose a shorter one"
            )


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # a name too long, for one
        return False


def check_writable(directory: Path, label: str, needed: int = MIN_FREE_BYTES, elsewhere: str = ELSEWHERE) -> None:
    """`directory` is a directory (or can be made one), can be written, and its disk has `needed` bytes free.
    Raises StorageError starting with `label` (e.g. hydra.run.dir=PATH) and saying what is wrong; nothing is
    left behind but the directory. `elsewhere` says where the user points to another path."""
    check_name_lengths(directory, label)
    if directory.exists() and not directory.is_dir():
        raise StorageError(f"{label} is a file, not a directory: remove it or {elsewhere} another path")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise StorageError(
            f"{label} cannot be created ({error.strerror or error}): {elsewhere} a writable directory"
        ) from error
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise StorageError(
            f"{label}: its disk has {free / MB:.0f} MB free, and a run needs at least "
            f"{needed / MB:.0f} MB: free space or {elsewhere} another disk"
        )
    try:
        handle, probe = tempfile.mkstemp(dir=directory, prefix=".write-test.", suffix=".tmp")
        try:
            os.write(handle, b"\0" * 4096)
            os.fsync(handle)
        finally:
            os.close(handle)
            os.unlink(probe)
    except OSError as error:
        raise StorageError(
            f"{label} cannot be written ({error.strerror or error}): {elsewhere} a writable directory"
        ) from error


def check_storage(directory: Path, checkpoint_bytes: int, keep: int) -> None:
    """The checkpoint directory can be written, and its disk holds at least two checkpoints (the one being
    written beside the last). Raises StorageError naming the directory otherwise."""
    check_writable(directory, f"the checkpoint directory {directory}", needed=0)
    free = shutil.disk_usage(directory).free
    if free < 2 * checkpoint_bytes:
        raise StorageError(
            f"the disk of {directory} has {free / MB:.0f} MB free, but a checkpoint takes about "
            f"{checkpoint_bytes / MB:.0f} MB and two must fit while one is written. Free space, or {ELSEWHERE} "
            "another disk."
        )
    if keep and free < (keep + 2) * checkpoint_bytes:
        log.warning(
            "the disk of %s has %.0f MB free: not enough for the %d periodic checkpoints "
            "trainer.keep_checkpoints keeps (about %.0f MB each)",
            directory,
            free / MB,
            keep,
            checkpoint_bytes / MB,
        )
