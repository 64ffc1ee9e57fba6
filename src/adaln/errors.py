"""The errors a user can cause and fix: the command prints them as one line and exits with status 2.

Anything else that escapes (a bug) keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A bad preset, flag, file or run directory; the message names it and says what was expected."""


class ConfigError(UserError, ValueError):
    """A preset, config file or override that cannot be used."""


class RunError(UserError):
    """A run directory that is locked, malformed or cannot be written (e.g. the disk is full)."""


class DataError(UserError, ValueError):
    """A data set or file that cannot be read (a missing folder, an undecodable or oversized image)."""


class TrainingDiverged(UserError):
    """The training loss became NaN or infinite."""


class Interrupted(Exception):
    """Training stopped by SIGINT or SIGTERM after writing a checkpoint at ``step``."""

    def __init__(self, signum: int, step: int, checkpoint: str):
        import signal

        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint {checkpoint}")

    @property
    def exit_status(self) -> int:
        """128 + the signal number, as a shell reports a process ended by that signal (130, 143)."""
        return 128 + self.signum
