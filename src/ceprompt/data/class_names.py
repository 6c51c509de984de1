"""Classes are words: matching the classes a dataset (or a user) names against the classes a model was trained
for, by name or through an alias table.

A model scores an image against the text embedding of each class's prompt, so it can score any class named in
words. A target class that matches a trained class is scored with that class's trained prompt (its prompt word,
e.g. the authors' ``disgusted`` for ``disgust``); any other name is *unseen* and is scored from its own words
through the same prompt construction.

Names match as the model's tokenizer reads them (HTML character references resolved, Unicode NFKC: fullwidth
letters and ligatures are the plain letters) after case folding and treating ``_``, ``-`` and spaces alike, then
through :data:`ALIASES` plus the config's ``data.class_aliases`` (entries ``ALIAS=CLASS``).
"""

from __future__ import annotations

import html
import re
import unicodedata
from dataclasses import dataclass
from typing import Sequence

from ..core.errors import ConfigError, brief

# Classes one model, list or request may name: each is a prompt through the text tower and a text embedding kept
# in memory (FER datasets have 7 or 8; CLIP's zero-shot ImageNet benchmark has 1000).
MAX_CLASSES = 1000

# canonical name -> the other names it goes by in FER datasets and papers
ALIASES: dict[str, tuple[str, ...]] = {
    "anger": ("angry",),
    "disgust": ("disgusted",),
    "fear": ("fearful", "scared"),
    "happy": ("happiness", "joy"),
    "sad": ("sadness",),
    "surprise": ("surprised",),
    "neutral": (),
    "contempt": (),
}


def normal(name: str) -> str:
    """``Happy_face`` -> ``happy face``: case, separators and what CLIP's tokenizer cleans away (``&#104;appy``,
    fullwidth ``ｈａｐｐｙ``, the ligature in ``ﬁerce``) do not distinguish classes: they give the same prompt."""
    text = unicodedata.normalize("NFKC", html.unescape(html.unescape(name)))
    return " ".join(part for part in re.split(r"[\s_-]+", text.casefold()) if part)


def parse_aliases(entries: Sequence[str] | None, where: str = "data.class_aliases") -> dict[str, str]:
    """``["joyful=happy", ...]`` -> {normal alias: normal class}; a malformed entry is one clear error."""
    table: dict[str, str] = {}
    for entry in entries or []:
        if not isinstance(entry, str) or entry.count("=") != 1:
            raise ConfigError(f"{where}: {brief(entry)} is not an alias; expected ALIAS=CLASS, e.g. joyful=happy")
        alias, target = (normal(part) for part in entry.split("="))
        if not alias or not target:
            raise ConfigError(f"{where}: {brief(entry)} has an empty side; expected ALIAS=CLASS")
        if table.get(alias, target) != target:
            raise ConfigError(f"{where}: {alias!r} is given for both {table[alias]!r} and {target!r}")
        table[alias] = target
    return table


def canonical(name: str, extra: dict[str, str] | None = None) -> str:
    """The name a class goes by in :data:`ALIASES` (or the config's aliases), else its normal form."""
    key = normal(name)
    if extra and key in extra:
        key = extra[key]
    for main, others in ALIASES.items():
        if key == main or key in others:
            return main
    return key


def check_class_list(names: Sequence[str], where: str, extra: dict[str, str] | None = None) -> list[str]:
    """A list of class names a user gave: not empty, no blank names, no two that mean the same class."""
    names = [str(n).strip() for n in names]
    if not names:
        raise ConfigError(f"{where}: no classes; expected at least one name")
    if len(names) > MAX_CLASSES:
        raise ConfigError(f"{where}: {len(names):,} classes; at most {MAX_CLASSES:,}")
    if any(not n for n in names):
        raise ConfigError(f"{where}: an empty class name in {brief(names)}")
    seen: dict[str, str] = {}
    for name in names:
        key = canonical(name, extra)
        if key in seen:
            raise ConfigError(f"{where}: {seen[key]!r} and {name!r} are the same class (after aliases)")
        seen[key] = name
    return names


@dataclass(frozen=True)
class ClassMatch:
    """How target classes map to a model's trained classes."""

    targets: list[str]  # the names asked for, in their order
    trained: list[int | None]  # per target: the trained class it matches, or None (unseen)
    words: list[str]  # per target: the words put in its prompt

    @property
    def seen(self) -> list[bool]:
        return [t is not None for t in self.trained]

    @property
    def identical(self) -> bool:
        """The targets are the trained classes, in the trained order (nothing to change)."""
        return all(t == i for i, t in enumerate(self.trained))

    def describe(self, trained_names: Sequence[str]) -> list[str]:
        return [f"{name} -> {trained_names[t]} (trained)" if t is not None else f"{name} (unseen: scored from its "
                "own words)" for name, t in zip(self.targets, self.trained)]


def match_classes(targets: Sequence[str], trained_names: Sequence[str], trained_words: Sequence[str],
                  aliases: Sequence[str] | None = None, where: str = "classes") -> ClassMatch:
    """Match ``targets`` against a model's classes (``trained_words``: the words its prompts used for them)."""
    extra = parse_aliases(aliases)
    targets = check_class_list(targets, where, extra)
    index = {canonical(name, extra): i for i, name in enumerate(trained_names)}
    trained = [index.get(canonical(name, extra)) for name in targets]
    words = [trained_words[t] if t is not None else name for name, t in zip(targets, trained)]
    return ClassMatch(list(targets), trained, words)
