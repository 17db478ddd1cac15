"""The errors a user can fix: every command-line entry point prints them as one line and exits 2.

Anything else that escapes is a bug and keeps its traceback. Each message names the input at fault (a
config key, a file, a flag) and says what to change.
"""


class UserError(Exception):
    """A bad input the user can fix; the message is one line that says how. The command-line handler
    prints ``{prefix}: {message}`` and exits with ``exit_code``."""
    prefix = "error"
    exit_code = 2


class ConfigError(UserError, ValueError):
    """A config file, override or flag that cannot be used as written."""


class DataError(UserError, ValueError):
    """Bad data or data config: a missing, unreadable or mis-shaped file, or labels that do not fit."""


class CorruptFileError(DataError):
    """A data file that cannot be read or decoded at all (what data.on_corrupt=skip skips)."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or directory the run needs (weights, a run dir, a VAE) is not there."""


class UnsupportedError(UserError, NotImplementedError):
    """A combination of settings this engine does not implement; the message says what to use instead."""


class DivergedError(UserError, FloatingPointError):
    """Training produced a non-finite loss; the message says at which step and what to change."""


class DiskFullError(UserError, OSError):
    """The disk filled while the run wrote a file; the message names it and what is still intact."""


class StalledError(UserError, TimeoutError):
    """A pipelined producer delivered nothing for longer than its timeout; the message names the step."""


class Stopped(UserError):
    """Training stopped on a signal (SIGTERM, SIGINT) after writing a checkpoint; not a failure of the run."""
    prefix = "stopped"

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum
