"""Samples on disk: guided-diffusion style npz files (arr_0: uint8 N x H x W x C; arr_1: labels), written
atomically, and the shards of a sharded run (shard_I_of_N.npz, with the settings they were drawn with)."""

import json
import re
import zipfile
import zlib
from pathlib import Path

import numpy as np
from hydra.utils import to_absolute_path

from ddpm.config.errors import ConfigError
from ddpm.io.checkpoint import check_file, file_kind, write_atomically

SHARD_FILE = re.compile(r"shard_(\d+)_of_(\d+)\.npz")


def shard_name(shard: int, num_shards: int) -> str:
    return f"shard_{shard}_of_{num_shards}.npz"


def save_npz(path: Path, arrays: dict[str, np.ndarray], meta: dict | None = None) -> Path:
    """Writes atomically: a killed job leaves no partial npz (for the merge, or for a user)."""
    if meta is not None:
        arrays = {**arrays, "meta": np.array(json.dumps(meta, sort_keys=True))}
    return write_atomically(path, lambda file: np.savez(file, **arrays))


def read_npz(path: Path, key: str) -> dict[str, np.ndarray]:
    """Every array of the npz file `path`, or ConfigError naming `key` when it is not one (missing, a
    directory, empty, truncated, another format)."""
    head = check_file(path, key, ConfigError)
    if not head.startswith(b"PK"):
        raise ConfigError(f"{key}={path} is not an npz file: it holds {file_kind(head)}")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, zlib.error) as error:
        reason = next(iter(str(error).splitlines()), "") or type(error).__name__
        raise ConfigError(
            f"{key}={path} is truncated or damaged: it cannot be read as an npz file ({reason})"
        ) from error


def read_samples(path: str | Path) -> tuple[np.ndarray, dict | None]:
    """uint8 N x H x W x C images from a guided-diffusion style npz (arr_0), and how they were drawn when the
    file records it (`meta`, written by task=sample and task=evaluate)."""
    path = Path(to_absolute_path(str(path)))
    data = read_npz(path, "eval.samples")
    if "arr_0" not in data:
        raise ConfigError(f"eval.samples={path} has no arr_0 (images N x H x W x C, uint8)")
    images = data["arr_0"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ConfigError(
            f"eval.samples={path}: arr_0 is {images.dtype} {images.shape}, expected uint8 N x H x W x (1 or 3)"
        )
    return images, json.loads(str(data["meta"])) if "meta" in data else None


def merge_shards(directory: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """Every shard_I_of_N.npz of `directory`, checked complete and consistent, concatenated in order."""
    directory = Path(to_absolute_path(str(directory)))
    found = {}
    for path in directory.glob("shard_*_of_*.npz"):
        match = SHARD_FILE.fullmatch(path.name)
        if match:
            found[(int(match[1]), int(match[2]))] = path
    totals = sorted({total for _, total in found})
    if not totals:
        raise ConfigError(f"eval.merge={directory} holds no shard_I_of_N.npz files")
    if len(totals) > 1:
        raise ConfigError(f"eval.merge={directory} holds shards of different runs (of {totals} shards): keep one")
    total = totals[0]
    missing = [shard_name(i, total) for i in range(total) if (i, total) not in found]
    if missing:
        raise ConfigError(f"eval.merge={directory} lacks {len(missing)} of {total} shards: {', '.join(missing)}")
    parts, metas = [], []
    for index in range(total):
        data = read_npz(found[(index, total)], "eval.merge")
        if "meta" not in data:
            raise ConfigError(
                f"eval.merge={directory}: {shard_name(index, total)} holds no meta (the settings it was "
                "drawn with): not a shard of task=evaluate eval.num_shards=N"
            )
        parts.append({key: value for key, value in data.items() if key != "meta"})
        metas.append(json.loads(str(data["meta"])))
    first = {k: v for k, v in metas[0].items() if k != "shard"}
    for index, meta in enumerate(metas):
        if {k: v for k, v in meta.items() if k != "shard"} != first:
            raise ConfigError(
                f"eval.merge={directory}: {shard_name(index, total)} was drawn with other settings than shard_0"
            )
    arrays = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
    if len(arrays["arr_0"]) != first["num_samples"]:
        raise ConfigError(
            f"eval.merge={directory}: the shards hold {len(arrays['arr_0'])} images, not {first['num_samples']}"
        )
    return arrays, first


def check_shard_dir(directory: Path, meta: dict, num_shards: int) -> None:
    """A shard directory holds the shards of one evaluation: a shard file there drawn with other settings (another
    checkpoint, sampler, seed or count) is refused rather than overwritten or merged with this one's."""
    for path in sorted(directory.glob("shard_*_of_*.npz")) if directory.is_dir() else ():
        match = SHARD_FILE.fullmatch(path.name)
        if match is None:
            continue
        try:
            theirs = json.loads(str(read_npz(path, "eval.shard_dir").get("meta", "null")))
        except ConfigError:
            theirs = None  # unreadable: not this evaluation's either
        same = isinstance(theirs, dict) and int(match[2]) == num_shards
        same = same and {k: v for k, v in theirs.items() if k != "shard"} == {
            k: v for k, v in meta.items() if k != "shard"
        }
        if not same:
            drawn_from = theirs.get("checkpoint") if isinstance(theirs, dict) else "unknown settings"
            raise ConfigError(
                f"eval.shard_dir={directory} holds {path.name}, drawn from {drawn_from} with other settings than "
                "this evaluation's: give this evaluation its own eval.shard_dir (a shard drawn again with the same "
                "settings replaces its file)"
            )
