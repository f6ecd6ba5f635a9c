"""Read what a wandb offline run wrote (`<run_dir>/wandb/offline-run-*/run-*.wandb`), without the network.

The file is a 7-byte header (b":W&B", a 2-byte magic, a 1-byte version) followed by a LevelDB-style log
in 32768-byte blocks (the header counts toward the first block). Each chunk has a 7-byte header:
a 4-byte checksum, a 2-byte little-endian length and a 1-byte type (1 full, 2 first, 3 middle, 4 last).
A block tail shorter than a chunk header is zero padding. Joined chunks are `wandb_internal_pb2.Record`s.
"""

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

FILE_HEADER = 7
IDENT = b":W&B"
BLOCK_SIZE = 32768
CHUNK_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _record_bytes(data: bytes) -> list[bytes]:
    """The payloads of the log's records, chunks joined, in file order."""
    if data[: len(IDENT)] != IDENT:
        raise ValueError(f"not a wandb run file: starts with {data[:FILE_HEADER]!r}")
    records, pending = [], None
    offset = FILE_HEADER
    while offset + CHUNK_HEADER <= len(data):
        left_in_block = BLOCK_SIZE - offset % BLOCK_SIZE
        if left_in_block < CHUNK_HEADER:  # zero padding to the end of the block
            offset += left_in_block
            continue
        _checksum, length, kind = struct.unpack_from("<IHB", data, offset)
        if kind == 0 and length == 0:  # zeros: padding or a preallocated tail
            offset += left_in_block
            continue
        start = offset + CHUNK_HEADER
        chunk = data[start : start + length]
        if len(chunk) != length:
            raise ValueError(f"truncated chunk at byte {offset}: wants {length} bytes, {len(chunk)} left")
        offset = start + length
        if kind == FULL:
            records.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE and pending is not None:
            pending += chunk
        elif kind == LAST and pending is not None:
            records.append(pending + chunk)
            pending = None
        else:
            raise ValueError(f"unexpected chunk type {kind} at byte {offset - length - CHUNK_HEADER}")
    return records


def read_wandb_records(path) -> list:
    """Every `wandb_internal_pb2.Record` in the run file at `path`, in the order written."""
    records = []
    for payload in _record_bytes(Path(path).read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def _key(item) -> str:
    return item.key or ".".join(item.nested_key)


def history_rows(records) -> list[dict]:
    """One dict per history record: {key: value}, keys include `_step` (nested keys joined by dots)."""
    return [
        {_key(item): json.loads(item.value_json) for item in record.history.item}
        for record in records
        if record.WhichOneof("record_type") == "history"
    ]


def config_values(records) -> dict:
    """The run's config: the run record's config, then every config record's updates, merged in order.

    wandb writes the config given to `wandb.init` inside the run record and later changes as config records.
    """
    config = {}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind not in ("run", "config"):
            continue
        updates = record.run.config if kind == "run" else record.config
        for item in updates.update:
            config[_key(item)] = json.loads(item.value_json)
        for item in updates.remove:
            config.pop(_key(item), None)
    return config
