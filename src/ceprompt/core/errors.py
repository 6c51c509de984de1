"""The project's own exceptions.

Every error a user can cause (a wrong path, a malformed file, a bad config value)
is raised as a :class:`CepromptError` whose message names the file, line or value
and says what was expected. The CLI prints that message as one line and exits
non-zero instead of showing a traceback.
"""

from __future__ import annotations

import reprlib
from typing import Any

_BRIEF = reprlib.Repr()  # attributes, not keywords: those need Python 3.12
_BRIEF.maxlevel, _BRIEF.maxstring, _BRIEF.maxother, _BRIEF.maxlong = 3, 80, 80, 40
_BRIEF.maxdict = _BRIEF.maxlist = _BRIEF.maxtuple = _BRIEF.maxset = 6


def brief(value: Any) -> str:
    """``repr(value)`` for an error message, bounded in size whatever the value (a 400-digit number, a list
    that YAML aliases make exponentially large, a megabyte of text)."""
    return _BRIEF.repr(value)


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
