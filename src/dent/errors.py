"""User-facing errors.

Every error a user can cause by bad input (a wrong name, a missing file, a bad config value) is a
:class:`DentError`. The CLI prints its message and exits with status 2, without a traceback.
"""


class DentError(Exception):
    """Base class for errors caused by user input; the message says what was wrong and what was expected."""


class ConfigError(DentError, ValueError):
    """A config key, value or file is invalid."""


class UnknownNameError(DentError, KeyError):
    """A name was looked up in a registry that does not hold it."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class DataNotFoundError(DentError, FileNotFoundError):
    """A data set could not be found in any of the places searched."""


class CorruptFileError(DentError):
    """A data archive, checkpoint or results store exists but cannot be read as expected."""


class OutputError(DentError):
    """An output directory or file cannot be created or written (a file in the way, read-only, disk full)."""


class InvalidInputError(DentError, ValueError):
    """A tensor passed to a model, defense or attack has the wrong shape, range or values."""
