"""Checkpoints: plain state dicts, the step and the resolved config, written atomically and read safely."""

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from ddpm.errors import CheckpointError

REQUIRED_KEYS = ("model", "step", "config")


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Writes `state` to a temporary file beside `path`, fsyncs it, then renames: never a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Reads a checkpoint with weights_only=True (no code runs on load) and checks that it is one of ours."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint={path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise CheckpointError(f"checkpoint={path} is not a readable checkpoint: {error}") from error
    if not isinstance(state, dict) or any(key not in state for key in REQUIRED_KEYS):
        found = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"checkpoint={path} is not a ddpm checkpoint: it needs the keys {list(REQUIRED_KEYS)}, found {found}"
        )
    return state
