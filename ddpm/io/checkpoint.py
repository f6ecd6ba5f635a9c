"""Checkpoints: plain state dicts, the step and the resolved config, written atomically and read safely.

Every checkpoint carries a SHA-256 digest of its own contents (tensor bytes and every other value), because a
zip archive with flipped bits in a tensor still loads: only the digest tells a damaged file from a good one.
"""

import hashlib
import logging
import os
import pickle
import re
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ddpm.config.errors import CheckpointError
from ddpm.config.moves import current_targets

log = logging.getLogger(__name__)

REQUIRED_KEYS = ("model", "step", "config")
DIGEST_KEY = "sha256"
PERIODIC = re.compile(r"step_(\d+)\.pt")


def periodic_name(step: int) -> str:
    return f"step_{step:07d}.pt"


def _feed(digest: "hashlib._Hash", value: Any) -> None:
    """Hashes a nested structure of containers, tensors and scalars in a fixed order, with type tags."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    elif isinstance(value, dict):
        digest.update(f"D{len(value)}".encode())
        for key in sorted(value, key=repr):
            _feed(digest, key)
            _feed(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"{type(value).__name__[0]}{len(value)}".encode())
        for item in value:
            _feed(digest, item)
    else:
        digest.update(f"S{type(value).__name__}:{value!r};".encode())


def content_digest(state: dict[str, Any]) -> str:
    digest = hashlib.sha256()
    _feed(digest, {key: value for key, value in state.items() if key != DIGEST_KEY})
    return digest.hexdigest()


def _fsync_directory(directory: Path) -> None:
    """Makes a rename in `directory` durable; a no-op where directories cannot be opened (Windows)."""
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def write_atomically(path: str | Path, write: Callable[[BinaryIO], None], also: tuple[str | Path, ...] = ()) -> Path:
    """`write(file)` into a temporary file beside `path`, fsynced, then renamed to `path`: never a partial file,
    also when the process is killed. Each path in `also` gets the same file (a hard link where possible)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes it private; these are ordinary files
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        for extra in map(Path, also):
            _link_or_copy(Path(temporary), extra)
        os.replace(temporary, path)
        _fsync_directory(path.parent)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def save_checkpoint(path: str | Path, state: dict[str, Any], also: tuple[str | Path, ...] = ()) -> Path:
    """Writes `state` (plus its digest) atomically to `path` (see write_atomically), and to each path in `also`.

    The tensors are copied to the host once, here, for both the digest and the file.
    """
    state = _to_cpu(state)
    state = {**state, DIGEST_KEY: content_digest(state)}
    return write_atomically(path, lambda file: torch.save(state, file), also)


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {key: _to_cpu(item) for key, item in value.items()}
    if type(value) in (list, tuple):  # not named tuples, whose constructors take fields
        return type(value)(_to_cpu(item) for item in value)
    return value


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def copy_checkpoint(source: str | Path, target: str | Path) -> Path:
    """`target` becomes the checkpoint `source` (best.pt from last.pt), replaced in one rename."""
    _link_or_copy(Path(source), Path(target))
    _fsync_directory(Path(target).parent)
    return Path(target)


def _link_or_copy(source: Path, target: Path) -> None:
    """`target` becomes a complete copy of `source` in one rename, whatever was there before."""
    staging = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    staging.unlink(missing_ok=True)
    try:
        os.link(source, staging)
    except OSError:  # no hard links here (some network file systems): copy the bytes
        with open(source, "rb") as src, open(staging, "wb") as dst:
            while chunk := src.read(1 << 24):
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
    os.replace(staging, target)


# The first bytes of formats a checkpoint or sample file is mistaken for most often.
KNOWN_FORMATS = (
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"\x93NUMPY", "a NumPy .npy array"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"PK\x03\x04", "a zip archive"),
    (b"PK\x05\x06", "an empty zip archive"),
)


def file_kind(head: bytes) -> str:
    """What a file seems to be from its first bytes, for the message that says it is not what was asked for."""
    for magic, kind in KNOWN_FORMATS:
        if head.startswith(magic):
            return kind
    if head[:1] == b"\x80":
        return "a pickle (torch's legacy format, or another program's)"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return "binary data of an unknown format"
    return "text"


def named(key: str, path: Path) -> str:
    """`key=path` for messages; a key ending in ":" (a description, not a config key) is followed by the path."""
    return f"{key} {path}" if key.endswith(":") else f"{key}={path}"


def check_file(path: Path, key: str, error: type[Exception] = CheckpointError) -> bytes:
    """The first bytes of `path` when it is a regular, non-empty file; else `error` naming `key` and saying
    what the path is instead (missing, a directory, empty)."""
    if path.is_dir():
        raise error(f"{named(key, path)} is a directory, not a file: name a file in it")
    if not path.exists():
        raise error(f"{named(key, path)} does not exist")
    if not path.is_file():
        raise error(f"{named(key, path)} is not a regular file")
    if path.stat().st_size == 0:
        raise error(f"{named(key, path)} is empty (0 bytes): a write that never finished, or a placeholder")
    with open(path, "rb") as file:
        return file.read(16)


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", *, key: str = "checkpoint", trust: bool = False
) -> dict[str, Any]:
    """Reads a checkpoint with weights_only=True (no code runs on load), checks that it is one of ours and that
    its contents match their digest. `key` is the config key that named the file, for the error messages; a
    checkpoint without a digest (another tool's, or edited) loads only with `trust` (trust_checkpoint=true)."""
    path = Path(path)
    head = check_file(path, key)
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; its directory is at the very end
        if head.startswith(b"PK\x03\x04"):
            raise CheckpointError(
                f"{named(key, path)} is truncated: its zip archive has no end (a copy or write cut short?)"
            )
        raise CheckpointError(
            f"{named(key, path)} is not a checkpoint: it holds {file_kind(head)}, not the zip archive torch.save writes"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{named(key, path)} holds objects other than tensors and plain values, which are not loaded "
            "(loading them could run code from the file)"
        ) from error
    except Exception as error:
        reason = next(iter(str(error).splitlines()), "") or type(error).__name__
        raise CheckpointError(
            f"{named(key, path)} is not a readable checkpoint (truncated or damaged?): {reason}"
        ) from error
    if not isinstance(state, dict) or any(name not in state for name in REQUIRED_KEYS):
        found = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"{named(key, path)} is not a ddpm checkpoint: it needs the keys {list(REQUIRED_KEYS)}, found {found}"
        )
    expected = state.pop(DIGEST_KEY, None)
    if expected is None and not trust:
        raise CheckpointError(
            f"{named(key, path)} carries no digest, so damage to it cannot be detected; if you trust the "
            "file, add trust_checkpoint=true"
        )
    if expected is not None and content_digest(state) != expected:
        raise CheckpointError(f"{named(key, path)} is corrupted: its contents do not match the digest stored with them")
    state["config"] = current_targets(state["config"])  # a checkpoint of the flat layout names its old modules
    return state


def periodic_checkpoints(directory: Path) -> list[Path]:
    """The `step_N.pt` files in `directory`, newest (highest step) first."""
    found = [(int(m.group(1)), p) for p in directory.glob("step_*.pt") if (m := PERIODIC.fullmatch(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def prune_periodic(directory: Path, keep: int) -> list[Path]:
    """Deletes all but the newest `keep` periodic checkpoints (keep=0 keeps all); returns what it deleted."""
    doomed = periodic_checkpoints(directory)[keep:] if keep > 0 else []
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed


def remove_temporaries(directory: Path) -> list[Path]:
    """Deletes the temporary files a write killed half-way leaves behind (`.NAME.pt.*.tmp`)."""
    leftovers = [p for p in directory.glob(".*.pt.*.tmp") if p.is_file()]
    for path in leftovers:
        path.unlink(missing_ok=True)
    return leftovers
