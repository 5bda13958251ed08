"""The errors a user can act on. The CLI prints a DreamtuneError as one line; anything else is a bug
and keeps its traceback."""

from __future__ import annotations


class DreamtuneError(Exception):
    """A problem with the user's input or machine; the message says what and what to do."""


class ConfigError(DreamtuneError, ValueError):
    """A config problem, found before any model loads; the message names the file and key."""


class DataError(DreamtuneError, ValueError):
    """A data source that cannot be read or used as asked; the message names the folder, file or column."""


class WeightsError(DreamtuneError, ValueError):
    """A weight file that is damaged, of another kind than expected, or does not fit the model."""


class ModelLoadError(DreamtuneError, RuntimeError):
    """The base model could not be loaded; the message says where we looked and what to do."""


class EnvironmentProblem(DreamtuneError, RuntimeError):
    """The installed packages are a combination known not to work; the message names the pin to set."""
