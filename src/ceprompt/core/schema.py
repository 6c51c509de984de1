"""The one check for what ceprompt reads back from a file (checkpoint descriptions, sidecars, Hub and Hugging Face
configs, CLIP metadata, caches): JSON of bounded size and depth, then fields of the expected type and range.

A crafted file must cost nothing before it is refused and must be refused in one line: ``json.loads`` on text
nested 100,000 deep raises RecursionError (a traceback), a size declared as 0, -2, "5" or [2] would surface as
a ZeroDivisionError or TypeError deep inside model construction.
"""

from __future__ import annotations

import json
import math
from typing import Any

MAX_DEPTH = 64  # our files nest a few levels (a config inside a checkpoint description)
MAX_BYTES = 16 << 20  # no description or config of ours comes near this


class SchemaError(ValueError):
    """A file's content is not what ceprompt expects; the message names the file and the field."""


def json_depth(text: str) -> int:
    """The deepest nesting of arrays and objects in JSON ``text``, found without parsing it."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def read_json(text: str | bytes, where: str, max_depth: int = MAX_DEPTH) -> Any:
    """Parsed JSON, refusing text over :data:`MAX_BYTES` or nested deeper than ``max_depth`` before parsing."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SchemaError(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if len(text) > MAX_BYTES:
        raise SchemaError(f"{where}: {len(text):,} characters of JSON; expected at most {MAX_BYTES:,}")
    depth = json_depth(text)
    if depth > max_depth:
        raise SchemaError(f"{where}: JSON nested {depth} levels deep; expected at most {max_depth}")
    try:
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite_float, parse_int=_bounded_int)
    except json.JSONDecodeError as exc:
        raise SchemaError(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    except SchemaError as exc:
        raise SchemaError(f"{where}: {exc}") from None
    except (ValueError, RecursionError) as exc:  # Python's own limit on integer digits, say
        raise SchemaError(f"{where}: unreadable JSON value ({str(exc)[:100]})") from None


def _no_constant(name: str) -> float:
    raise SchemaError(f"{name} is not a number JSON allows")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 reads as infinity
        raise SchemaError(f"{text[:40]} is not a finite number")
    return value


MAX_INT_DIGITS = 40  # no count, size or seed of ours comes near 10**40


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise SchemaError(f"an integer of {len(text)} digits; expected at most {MAX_INT_DIGITS}")
    return int(text)


def expect(data: Any, key: str, where: str, kind: type | tuple[type, ...], *, lo: float | None = None,
          hi: float | None = None, optional: bool = False, default: Any = None) -> Any:
    """``data[key]`` checked: an object holding it, the type (bool is never an int), a finite number in
    [lo, hi]. ``optional``: ``default`` when missing or null."""
    if not isinstance(data, dict):
        raise SchemaError(f"{where}: expected a JSON object, found {type(data).__name__}")
    value = data.get(key)
    if value is None:
        if optional:
            return default
        raise SchemaError(f"{where}: {key} is missing")
    kinds = kind if isinstance(kind, tuple) else (kind,)
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise SchemaError(f"{where}: {key}={_short(value)}; expected {' or '.join(k.__name__ for k in kinds)}")
    if is_number:
        if not math.isfinite(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
            bounds = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
            raise SchemaError(f"{where}: {key}={_short(value)}; expected a number in {bounds}")
    return value


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
