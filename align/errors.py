"""User-facing errors: each one ends the run with a single line and its own exit code.

Anything else that escapes is a bug in align and keeps its traceback.
"""

from __future__ import annotations


class AlignError(Exception):
    """A problem the user can fix (config, data, model, checkpoint), reported in one line."""

    exit_code = 1


class ConfigError(AlignError):
    exit_code = 2


class DataError(AlignError):
    exit_code = 3


class ModelError(AlignError):
    exit_code = 4


class CheckpointError(AlignError):
    exit_code = 5


class TrainingError(AlignError):
    """The run itself went wrong (non-finite loss, ...) after a clean start."""

    exit_code = 6


class Preempted(AlignError):
    """SIGUSR1 arrived: a checkpoint was written and the job should be requeued (jobs/common.sh)."""

    exit_code = 75
