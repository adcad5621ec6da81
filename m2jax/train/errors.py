"""The ways a run stops on purpose, each with the exit code the launches give it.

The launches print an error's message on one line (no traceback unless `--verbosity >= 0`) and
exit with its `exit_code`, so a scheduler can tell a bad config from a full disk from a
preemption. The table is in docs/training.md.
"""

from __future__ import annotations

EXIT_OK = 0  # finished now, or finished before (the stored results are reported)
EXIT_UNEXPECTED = 1  # anything else: a bug or an environment problem (with its traceback)
# A preemption (SIGTERM, or orbax's preemption notice) after its checkpoint was saved: re-run
# the same command to resume. 75 is EX_TEMPFAIL of sysexits.h, "try again later".
EXIT_PREEMPTED = 75


class RunError(Exception):
    """A run stopped with a message that says what to do; nothing saved was lost."""

    exit_code = EXIT_UNEXPECTED


class ConfigError(RunError, ValueError):
    """A config value out of range or inconsistent, found before anything was built."""

    exit_code = 3


class DataError(RunError, ValueError):
    """Input data that cannot train the model (no examples, missing labels, ...)."""

    exit_code = 4


class NonFiniteError(RunError, FloatingPointError):
    """A NaN or infinite loss or gradient; the step was not applied and not saved."""

    exit_code = 5


class CheckpointError(RunError):
    """The work directory's checkpoints cannot be resumed (none readable, or written by another
    config); nothing in it was changed."""

    exit_code = 6


class CheckpointMismatchError(CheckpointError, ValueError):
    """A readable checkpoint that does not fit the current model, optimizer or input pipeline."""


class WorkdirError(RunError, OSError):
    """The work directory cannot be written (full disk, permissions, a file in the way)."""

    exit_code = 7
