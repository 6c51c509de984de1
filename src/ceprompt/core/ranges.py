"""The one validator for numeric settings: config fields, command-line options and API arguments.

Every check is NaN-safe: a value passes only when it is finite and each bound comparison is true,
so ``nan`` (for which every comparison is false) and infinities are always refused.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any, Callable

from .errors import ConfigError, brief


@dataclass(frozen=True)
class Range:
    """Allowed values of one numeric setting."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # lo itself is not allowed
    hi_open: bool = False
    integer: bool = False

    def contains(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.lo is not None and not (value > self.lo if self.lo_open else value >= self.lo):
            return False
        if self.hi is not None and not (value < self.hi if self.hi_open else value <= self.hi):
            return False
        return True

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a number"
        if self.lo is not None and self.hi is not None:
            left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
            return f"{kind} in {left}{_fmt(self.lo)}, {_fmt(self.hi)}{right}"
        if self.lo is not None:
            return f"{kind} {'>' if self.lo_open else '>='} {_fmt(self.lo)}"
        if self.hi is not None:
            return f"{kind} {'<' if self.hi_open else '<='} {_fmt(self.hi)}"
        return f"a finite {'integer' if self.integer else 'number'}"


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() and abs(v) < 1e15 else f"{v:g}"


POSITIVE = Range(0, lo_open=True)
POSITIVE_INT = Range(1, integer=True)
COUNT = Range(0, integer=True)  # 0, 1, 2, ...
UNIT = Range(0, 1)  # a weight or probability
FINITE = Range()
THREADS = Range(1, 1024, integer=True)  # CPU threads a user may ask for (--threads, threads=)


def check(name: str, value: Any, allowed: Range) -> Any:
    """``value`` if it is a number inside ``allowed``, else a ConfigError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name}={brief(value)}; expected {allowed.describe()}")
    if allowed.integer and not (isinstance(value, int) or (math.isfinite(value) and float(value).is_integer())):
        raise ConfigError(f"{name}={brief(value)}; expected {allowed.describe()}")
    try:
        inside = allowed.contains(float(value))
    except OverflowError:  # an integer too large for a float is outside every range
        inside = False
    if not inside:
        raise ConfigError(f"{name}={brief(value)}; expected {allowed.describe()}")
    return int(value) if allowed.integer else value


def arg(allowed: Range, name: str = "value") -> Callable[[str], Any]:
    """An argparse ``type=`` that parses and range-checks an option (a bad value exits with status 2)."""

    def parse(text: str) -> Any:
        try:
            value: Any = int(text) if allowed.integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {allowed.describe()}") from None
        try:
            return check(name, value, allowed)
        except ConfigError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {allowed.describe()}") from None

    parse.__name__ = allowed.describe()  # argparse shows this name in "invalid <name> value" messages
    return parse
