"""Exceptions raised by capsem for bad user input.

Every error message is one line that names the offending thing (a file, a flag,
a tensor) and says what is accepted, so that command-line tools can print it
without a stack trace.
"""


class CapsemError(Exception):
    """Base class of capsem's user-facing errors."""


class DataError(CapsemError, ValueError):
    """A dataset file or directory is missing, corrupt or of the wrong kind."""


class ConfigError(CapsemError, ValueError):
    """A flag or configuration value is invalid or does not match a checkpoint."""


class CheckpointError(CapsemError, ValueError):
    """A checkpoint or weight source cannot be loaded into the model."""


class TrainingError(CapsemError, RuntimeError):
    """Training had to stop (for example after too many non-finite steps)."""
