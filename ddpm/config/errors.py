"""Errors that mean "the user asked for something wrong": shown as one message, without a traceback."""


class UserError(Exception):
    """Base class of every expected error; `main.py` prints its message and exits with status 1."""


class ConfigError(UserError, ValueError):
    """A config value is out of range or inconsistent with another one. The message names the key."""


class DatasetNotFoundError(UserError, FileNotFoundError):
    """The data a dataset needs is not where the config says."""


class CheckpointError(UserError):
    """A checkpoint is missing, unreadable, or does not fit what was asked of it."""


class NonFiniteError(UserError, FloatingPointError):
    """Training produced a non-finite loss or gradient norm more often than allowed."""


class StorageError(UserError, OSError):
    """The run directory cannot be written, or its disk is too full for a checkpoint."""


class RunDirectoryInUse(UserError):
    """Another process holds the run directory (ddpm.runtime.run_directory)."""
