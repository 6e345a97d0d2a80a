"""Errors that prn reports to users. Each message names the file or setting and the problem.

Each kind carries the exit status the CLI ends with (README, "Exit statuses"), so a script can
tell a mistyped command from a bad image or a bad model file.
"""

from enum import IntEnum


class ExitStatus(IntEnum):
    OK = 0
    ERROR = 1          # anything else (a bug shows its traceback)
    USAGE = 2          # the command line: unknown flag, a value of the wrong type, conflicting flags
    DEFECT = 3         # reserved for `prn predict --fail-on-defect`: some image judged defective
    DATA = 4           # input data: dataset, image, mask, config or input file missing or unreadable
    MODEL = 5          # model files: checkpoint or backbone weights missing, unsafe or incompatible
    TRAINING = 6       # training cannot go on (non-finite loss, the asked-for device is absent)
    INTERRUPTED = 130  # Ctrl-C / SIGINT (128 + 2, the shell's convention)


class PRNError(Exception):
    """Base of the errors prn raises for bad input; the CLI prints them without a traceback."""

    exit_status = ExitStatus.ERROR


class UsageError(PRNError):
    """The command line asks for something that cannot be done or would be silently ignored."""

    exit_status = ExitStatus.USAGE


class DataError(PRNError, ValueError):
    """A dataset, image or mask is missing, unreadable or inconsistent."""

    exit_status = ExitStatus.DATA


class CheckpointError(PRNError):
    """A checkpoint is missing, unsafe, or from an incompatible model or version."""

    exit_status = ExitStatus.MODEL


class TrainingError(PRNError):
    """Training cannot go on (for example the loss became NaN)."""

    exit_status = ExitStatus.TRAINING
