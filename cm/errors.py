"""Errors that are the user's to act on. The CLI reports them in one line, without a traceback."""


class ConfigError(ValueError):
    """A configuration mistake; the message names the key, the bad value and what is allowed."""


class DataError(ValueError):
    """A data source that is missing or malformed; the message names the file or setting."""


class CorruptFileError(ValueError):
    """A file that exists but cannot be read as what it should be; the message names it."""


class NonFiniteLossError(RuntimeError):
    """Training produced NaN/inf losses more often than `train.max_nonfinite_steps` allows."""


USER_ERRORS = (ConfigError, DataError, CorruptFileError, FileNotFoundError, NonFiniteLossError)
