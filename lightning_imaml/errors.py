"""Errors that are the user's (a wrong path, a size the data cannot serve, an incompatible checkpoint), as
subclasses of the built-in types code already catches (``ValueError``, ``FileNotFoundError``), marked with
:class:`UserInputError` so that ``train.py`` reports them in one line instead of a traceback."""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "DataNotFoundError",
    "InvalidSettingError",
    "UserInputError",
]


class UserInputError(Exception):
    """Marker: the message names the bad value and the fix; a traceback would add nothing for the user."""


class InvalidSettingError(UserInputError, ValueError):
    """A setting the data or the model cannot serve, e.g. more ways than a split has classes."""


class DataNotFoundError(UserInputError, FileNotFoundError):
    """A dataset that is not where the settings say."""


class CheckpointNotFoundError(UserInputError, FileNotFoundError):
    """A checkpoint path that does not exist."""


class CheckpointError(UserInputError, ValueError):
    """A file that is not a readable Lightning checkpoint, or one of another learner or network."""
