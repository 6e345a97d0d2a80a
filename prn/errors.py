"""Errors that prn reports to users. Each message names the file or setting and the problem."""


class PRNError(Exception):
    """Base of the errors prn raises for bad input; the CLI prints them without a traceback."""


class DataError(PRNError, ValueError):
    """A dataset, image or mask is missing, unreadable or inconsistent."""


class CheckpointError(PRNError):
    """A checkpoint is missing, unsafe, or from an incompatible model or version."""


class TrainingError(PRNError):
    """Training cannot go on (for example the loss became NaN)."""
