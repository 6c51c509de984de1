"""The one place that maps a stage's name (the config's ``stage``) to its class."""

from __future__ import annotations

from ..core.errors import ConfigError
from .cat import CAT
from .eva import EVA
from .stage import Stage

STAGES: dict[str, type[Stage]] = {stage.name: stage for stage in (EVA, CAT)}
# The stage that scores the untuned CLIP with fixed prompts: the zero-shot baseline.
ZERO_SHOT = EVA


def stage_class(name: str) -> type[Stage]:
    try:
        return STAGES[name]
    except (KeyError, TypeError):
        raise ConfigError(f"stage={name!r}; expected one of {tuple(STAGES)}") from None
