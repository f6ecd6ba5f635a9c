"""The run directory: usable before anything is written there, owned by one run at a time, and cleared of an
earlier run's files (moved aside, never deleted) when a new run starts over in it.

Ownership is an exclusive lock on `<run dir>/run.lock` (flock), taken before Hydra writes its own files there
and held for the life of the process: the operating system releases it when the process ends in any way, so a
killed or requeued job never leaves a stale lock. Rank 0 takes it for all ranks of a data-parallel run. The
file names the holder (host, PID, start time, SLURM job), so a second process can say who has the directory.

A run is known by the id in `<run dir>/run.json`, which every checkpoint of it carries too; `trainer.resume=
auto` continues only checkpoints of that run.
"""

import datetime
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import sys
import uuid
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from ddpm.config.errors import RunDirectoryInUse, UserError
from ddpm.config.faults import print_error
from ddpm.config.launcher import check_launcher
from ddpm.runtime.preflight import check_writable
from ddpm.runtime.sweep_directory import claim_sweep

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
RUN_FILE = "run.json"
EARLIER_RUNS = "previous"  # <run dir>/previous/<when it was moved>/: the files of runs started over
# What a training run writes into its directory, besides Hydra's own files: moved aside together.
RUN_FILES = (RUN_FILE, "checkpoints", "samples", "metrics.jsonl", "summary.json", "config.yaml", "wandb")

HYDRA_RECORDS = ".hydra"  # Hydra's config.yaml, hydra.yaml and overrides.yaml of the command that ran
_held: dict[Path, int] = {}
_records: dict[
    Path, dict[str, bytes]
] = {}  # run directory -> its .hydra/ files before this command  # run directory -> the open file descriptor that holds its lock


def launch_rank() -> int:
    """This process's rank as its launcher set it (torchrun's RANK, else SLURM's task index), before any
    process group exists; 0 for a single process."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def claim(directory: str | Path, key: str = "hydra.run.dir", lock_file: str = LOCK_FILE) -> None:
    """Takes the run directory for this process (a no-op if it holds it already), or raises RunDirectoryInUse
    naming the holder. Where the file system has no locks (some network file systems), warns and goes on."""
    directory = Path(directory).resolve()
    if directory in _held:
        return
    directory.mkdir(parents=True, exist_ok=True)
    handle = os.open(directory / lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(handle)
        os.close(handle)
        raise RunDirectoryInUse(
            f"{key}={directory} is in use by {holder}: wait for that run to end, stop it, or choose another {key}"
        ) from None
    except OSError as error:
        if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            os.close(handle)
            raise
        log.warning("%s=%s is on a file system without locks: a second run there would not be refused", key, directory)
    os.ftruncate(handle, 0)
    os.write(handle, json.dumps(_holder()).encode())
    os.fsync(handle)
    _held[directory] = handle


def release(directory: str | Path) -> None:
    handle = _held.pop(Path(directory).resolve(), None)
    if handle is not None:
        os.close(handle)  # closing the descriptor releases the lock


def keep_hydra_records(directory: Path) -> None:
    """Remembers the run directory's .hydra/ files as they are before Hydra writes this command's over them."""
    records = directory.resolve() / HYDRA_RECORDS
    _records[directory.resolve()] = {
        path.name: path.read_bytes() for path in (records.iterdir() if records.is_dir() else ()) if path.is_file()
    }


def restore_hydra_records(directory: str | Path) -> None:
    """Puts back the .hydra/ files of the run directory as they were before this command (which was refused):
    they describe the run that is there, not a command that did nothing."""
    kept = _records.get(Path(directory).resolve())
    if not kept:  # nothing was there: the refused command's records describe all that happened
        return
    for name, content in kept.items():
        (Path(directory).resolve() / HYDRA_RECORDS / name).write_bytes(content)


def release_all() -> None:
    for directory in list(_held):
        release(directory)


def _holder() -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
    }


def _read_holder(handle: int) -> str:
    try:
        holder = json.loads(os.pread(handle, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        holder = {}
    if "pid" not in holder:
        return "another process (it has not written its name yet)"
    job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"PID {holder['pid']} on {holder.get('host', '?')} (started {holder.get('started', '?')}{job})"


def run_id(directory: Path) -> str | None:
    """The id of the run this directory holds (None before any run, or for runs of older versions)."""
    try:
        return json.loads((directory / RUN_FILE).read_text())["run_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def record_run(directory: Path, identifier: str | None = None) -> str:
    """Writes run.json for the run with `identifier` (a new one when None) and returns the id."""
    identifier = identifier or uuid.uuid4().hex[:16]
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    (directory / RUN_FILE).write_text(json.dumps({"run_id": identifier, "started": started}) + "\n")
    return identifier


def move_earlier_run_aside(directory: Path) -> Path | None:
    """Moves an earlier run's files (RUN_FILES) into <directory>/previous/<now>/ and returns that folder, or
    None when there are none. Hydra's own files (.hydra/, the log) stay: they belong to the new run already."""
    present = [
        path.name
        for path in (directory / name for name in RUN_FILES)
        if path.is_file() or (path.is_dir() and any(path.iterdir()))
    ]
    return move_aside(directory, present) if present else None


def move_aside(directory: Path, names: list[str]) -> Path:
    """Moves the entries `names` of `directory` into <directory>/previous/<now>/ (nothing is deleted) and
    returns that folder."""
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    target = directory / EARLIER_RUNS / stamp
    suffix = 1
    while target.exists():
        target, suffix = directory / EARLIER_RUNS / f"{stamp}_{suffix}", suffix + 1
    target.mkdir(parents=True)
    for name in names:
        shutil.move(str(directory / name), str(target / name))
    return target


def _refuse(error: UserError) -> None:
    """One line and exit status 1: Hydra has not set up logging yet where the callbacks run."""
    print_error(error)
    sys.exit(1)


class ClaimRunDirectory(Callback):
    """Before Hydra writes its files into the run directory: it can be written, and no other run holds it.
    A sweep's directory is checked for writing and belongs to one sweep (ddpm.runtime.sweep_directory); each job
    of a sweep claims its own directory when it starts."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        directory = Path(config.hydra.run.dir)
        try:
            check_writable(directory, f"hydra.run.dir={directory}")
            task = OmegaConf.select(config, "hydra.runtime.choices.task") or "train"
            if task != "train" and (directory / RUN_FILE).is_file():
                raise UserError(
                    f"hydra.run.dir={directory} holds a training run: task={task} would write its records "
                    "(.hydra/) over the run's; give it a directory of its own (the default, or another "
                    "hydra.run.dir)"
                )
            if launch_rank() == 0:
                claim(directory)
                keep_hydra_records(directory)
        except UserError as error:
            _refuse(error)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_launcher(config.hydra.get("launcher"))
            check_writable(Path(config.hydra.sweep.dir), f"hydra.sweep.dir={config.hydra.sweep.dir}")
            # The search space counts wherever it was given (the command line, or an experiment's file).
            params = config.hydra.sweeper.get("params") or {}
            space = [f"hydra.sweeper.params.{key}={value}" for key, value in params.items()]
            claim_sweep(Path(config.hydra.sweep.dir), [*config.hydra.overrides.task, *space])
        except UserError as error:
            _refuse(error)
