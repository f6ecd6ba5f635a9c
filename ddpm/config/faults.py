"""The one line a fault ends in. main.py shows every error this recognizes as one line without a traceback
(exit status 1); anything else is a bug, and keeps its traceback.

Besides the project's own UserErrors, some faults come from outside the code and have one explanation each: a
DataLoader worker that died (killed, or out of memory), an error raised inside a worker (which DataLoader
re-raises with the worker's traceback in its message), and a disk that is full or read-only.
"""

import errno
import re
import shutil
import sys
from pathlib import Path

from ddpm.config.errors import StorageError, UserError

MB = 1 << 20
WORKER_DIED = re.compile(
    r"DataLoader worker \(pid\(?s?\)? ?([\d, ]+)\) (is killed by signal: [\w ]+|exited unexpectedly)"
)
STORAGE_ERRNOS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EROFS: "the file system is read-only",
}


def explain(error: BaseException, num_workers: object = None) -> UserError | None:
    """The UserError to show for `error` (also when it is the cause of a wrapper, e.g. Hydra's instantiate
    error), or None when it is not a recognized fault. `num_workers` is trainer.num_workers, for the advice."""
    for link in _chain(error):
        if isinstance(link, UserError):
            return _without_worker_traceback(link)
        if isinstance(link, RuntimeError) and (match := WORKER_DIED.search(str(link))):
            return UserError(
                f"a data-loading worker (pid {match[1].strip()}) {match[2].replace('is killed', 'was killed')}: it may "
                f"have run out of memory; lower trainer.num_workers{'' if num_workers is None else f'={num_workers}'} "
                "or trainer.batch_size, or run with "
                "trainer.num_workers=0 to see the error in the main process"
            )
        if isinstance(link, OSError) and link.errno in STORAGE_ERRNOS:
            where = Path(link.filename).parent if link.filename else None
            free = f" ({shutil.disk_usage(where).free / MB:.0f} MB free)" if where and where.exists() else ""
            return StorageError(
                f"writing {link.filename or 'a file'} failed: {STORAGE_ERRNOS[link.errno]}{free}. "
                "Free space (or point hydra.run.dir at another disk) and run the same command again"
            )
    return None


def one_line(error: BaseException | str) -> str:
    """The message on one line: line breaks inside it would read as several errors."""
    return " ".join(str(error).split())


def print_error(error: BaseException | str) -> None:
    """The one line, where Hydra's logging is not set up (before a run starts, or after it ended)."""
    print(f"[ddpm][ERROR] - {one_line(error)}", file=sys.stderr)


def _chain(error: BaseException | None):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__


def _without_worker_traceback(error: UserError) -> UserError:
    """A UserError raised in a DataLoader worker arrives as 'Caught X in DataLoader worker process N. Original
    Traceback ...'; its own message is the traceback's last line, after the class name."""
    text = str(error)
    if not text.startswith("Caught ") or "Original Traceback" not in text:
        return error
    last = [line for line in text.splitlines() if line.strip()][-1]
    message = last.split(": ", 1)[1] if ": " in last else last
    return type(error)(message)
