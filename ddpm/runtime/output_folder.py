"""A folder of one command's outputs (task=sample's PNG files and samples.npz): owned by one process at a time,
never mixed with an earlier command's files, and whole or untouched.

The files are written into a hidden staging folder inside it and moved into place when all are written,
samples.npz last; an earlier command's files are refused unless the user asks to replace them, and then moved
aside into `previous/<date>_<time>/` (as a run directory's are), only once the new set is complete. A command
that fails or is stopped leaves the folder as it was.
"""

import shutil
from pathlib import Path

from ddpm.config.errors import ConfigError
from ddpm.runtime.preflight import check_writable
from ddpm.runtime.run_directory import EARLIER_RUNS, claim, move_aside

LOCK_FILE = ".outputs.lock"
STAGING = ".writing"


class OutputFolder:
    def __init__(self, directory: Path, key: str, *, replace: bool, replace_key: str):
        self.directory, self.key = directory, key
        check_writable(directory, f"{key}={directory}", elsewhere=f"point {key} at")
        claim(directory, key=key, lock_file=LOCK_FILE)
        self.earlier = sorted(
            path.name for path in directory.iterdir() if not path.name.startswith(".") and path.name != EARLIER_RUNS
        )
        if self.earlier and not replace:
            shown = ", ".join(self.earlier[:3]) + (
                f" and {len(self.earlier) - 3} more" if len(self.earlier) > 3 else ""
            )
            raise ConfigError(
                f"{key}={directory} holds an earlier command's outputs ({shown}): set {replace_key}=true to move "
                f"them aside into {directory / EARLIER_RUNS}/ once the new ones are written, or choose another {key}"
            )
        self.staging = directory / STAGING
        shutil.rmtree(self.staging, ignore_errors=True)  # a stopped command's, never published
        self.staging.mkdir()

    def publish(self, last: str) -> None:
        """Moves the earlier outputs aside and the staged files into place, `last` (the file that says the set is
        complete) after every other one."""
        if self.earlier:
            move_aside(self.directory, self.earlier)
        staged = sorted(self.staging.iterdir(), key=lambda path: path.name == last)
        for path in staged:
            path.replace(self.directory / path.name)
        self.staging.rmdir()

    def discard(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
