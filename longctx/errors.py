"""Errors a user can fix. The CLI prints these as one line (no traceback) and exits non-zero."""


class LongctxError(Exception):
    """Base class: the message says what is wrong and how to fix it."""


class ConfigError(LongctxError, ValueError):
    """A model, training or command configuration that cannot work."""


class DataError(LongctxError, ValueError):
    """A missing, empty or malformed data source."""


class CheckpointError(LongctxError):
    """A checkpoint directory that is missing, incomplete or corrupt."""
