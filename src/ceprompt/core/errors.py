"""The project's own exceptions.

Every error a user can cause (a wrong path, a malformed file, a bad config value)
is raised as a :class:`CepromptError` whose message names the file, line or value
and says what was expected. The CLI prints that message as one line and exits
non-zero instead of showing a traceback.
"""

from __future__ import annotations


class CepromptError(Exception):
    """Base class of every error ceprompt raises on purpose."""


class CheckpointError(CepromptError):
    """A weights file is missing, unreadable, of an unknown format or not what was expected."""


class ConfigError(CepromptError):
    """A config file or a ``--set`` override is malformed or holds an invalid value."""


class DataError(CepromptError):
    """A dataset is missing files, holds malformed lines or unreadable images."""


class TrainingError(CepromptError):
    """Training cannot go on (a non-finite loss, for example); the last good checkpoint is kept."""
