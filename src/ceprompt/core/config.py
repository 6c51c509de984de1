"""The generic config machinery: dataclass sections filled from YAML files, from ``--set KEY=VALUE`` text and from
typed Python values, all through the same coercion and the same checks.

A section is a dataclass whose fields may say what they accept (:func:`setting`: a numeric :class:`Range`, a tuple
of choices); :func:`check_fields` checks every such field of a section tree in one pass, naming the dotted key.
What the sections are (the run config, the stages' settings) lives with what they configure; this module knows
none of them.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import yaml

from .errors import ConfigError, brief
from .ranges import Range, check

MAX_VALUES = 10_000  # a config holds about a hundred values
_RANGE, _CHOICES = "ceprompt.range", "ceprompt.choices"


def setting(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, accepts: Range | None = None,
            choices: Sequence[Any] | None = None) -> Any:
    """A dataclass field with what it accepts: ``accepts`` a numeric range (each element of a list of numbers),
    ``choices`` the values it may take (None is allowed where the annotation allows it)."""
    metadata = {}
    if accepts is not None:
        metadata[_RANGE] = accepts
    if choices is not None:
        metadata[_CHOICES] = tuple(choices)
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def field_range(f: dataclasses.Field) -> Range | None:
    return f.metadata.get(_RANGE)


def field_choices(f: dataclasses.Field) -> tuple[Any, ...] | None:
    return f.metadata.get(_CHOICES)


def allows_none(annotation: Any) -> bool:
    return type(None) in typing.get_args(annotation)


def check_fields(obj: Any, prefix: str = "") -> None:
    """Every range and choice declared with :func:`setting`, in the section tree under ``obj`` (NaN and
    infinities are outside every range)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        name, value = f"{prefix}{f.name}", getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            check_fields(value, f"{name}.")
            continue
        if value is None and allows_none(hints[f.name]):
            continue
        allowed = field_range(f)
        if allowed is not None:
            for item in value if isinstance(value, list) else [value]:
                check(name, item, allowed)
        choices = field_choices(f)
        if choices is not None and any(item not in choices for item in (value if isinstance(value, list) else [value])):
            what = "a list of" if isinstance(value, list) else "one of"
            raise ConfigError(f"{name}={brief(value)}; expected {what} {choices}")


def numeric_fields(obj: Any, prefix: str = "") -> list[tuple[str, dataclasses.Field]]:
    """(dotted name, field) of every int or float field (or list of them) in the section tree under ``obj``."""
    out = []
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out += numeric_fields(value, f"{prefix}{f.name}.")
        elif _is_numeric(hints[f.name]):
            out.append((f"{prefix}{f.name}", f))
    return out


def _is_numeric(annotation: Any) -> bool:
    options = typing.get_args(annotation) or (annotation,)
    if typing.get_origin(annotation) is list:
        options = typing.get_args(annotation)
    return any(o in (int, float) for o in options) and not any(o in (str, bool) for o in options)


def _is_bool(value: Any) -> bool:
    return isinstance(value, (bool, np.bool_))  # numpy's bool is not a Python bool


def coerce(value: Any, annotation: Any, key: str) -> Any:
    """``value`` as the field's annotated type: YAML values and Python values alike (numpy scalars, paths)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(value, option, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {brief(value)}")
        return [coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if annotation is bool:
        if _is_bool(value):
            return bool(value)
        raise ConfigError(f"{key}: expected true or false, got {brief(value)}")
    if annotation is int:
        if isinstance(value, numbers.Integral) and not _is_bool(value):
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {brief(value)}")
    if annotation is float:
        if isinstance(value, numbers.Real) and not _is_bool(value):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {brief(value)}")
    if annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if isinstance(value, numbers.Real) and not _is_bool(value):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {brief(value)}")
    return value


def merge(obj: Any, data: Mapping[str, Any], where: str, prefix: str = "") -> None:
    """Set the fields of the section tree ``obj`` from a nested mapping (a YAML file, or nested overrides)."""
    fields = typing.get_type_hints(type(obj))
    for key, value in data.items():
        dotted_key = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"{where}: unknown key {brief(dotted_key)}; expected one of "
                              f"{sorted(prefix + k for k in fields)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}: {brief(dotted_key)} must be a mapping of its fields, got {brief(value)}")
            merge(current, value, where, dotted_key + ".")
        else:
            try:
                setattr(obj, key, coerce(value, fields[key], dotted_key))
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc}") from None


def nested(key: str, value: Any, where: str) -> dict[str, Any]:
    """``"a.b.c", v`` -> ``{"a": {"b": {"c": v}}}``."""
    if not isinstance(key, str) or not key.strip() or any(not part for part in key.strip().split(".")):
        raise ConfigError(f"{where}: malformed key {brief(key)}; expected section.key, e.g. optim.lr")
    out: dict[str, Any] = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def apply_values(obj: Any, values: Mapping[str, Any], where: str = "setting") -> None:
    """Set fields of ``obj`` from ``{"optim.epochs": 3, ...}``: Python values, coerced and checked like YAML's."""
    for key, value in values.items():
        check_size(value, f"{where} {brief(key)}")
        merge(obj, nested(key, value, where), f"{where} {key}")


def parse_override(text: str) -> dict[str, Any]:
    """``a.b.c=value`` -> ``{"a": {"b": {"c": value}}}``, the value read as YAML (numbers, lists, null)."""
    if not isinstance(text, str) or "=" not in text:
        raise ConfigError(f"--set {brief(text)}: expected KEY=VALUE, e.g. optim.lr=2e-4")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except (yaml.YAMLError, RecursionError, ValueError):  # ValueError: an integer of thousands of digits
        value = raw
    check_size(value, f"--set {brief(text)}")
    return nested(key, value, f"--set {brief(text)}")


def dotted(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A config as written (nested mappings) as ``section.key`` -> value, the names ``--set`` takes."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            out.update(dotted(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML would keep the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # a merge (<<) may repeat keys on purpose; configs have only scalar keys
            key = self.construct_object(key_node)
            if key in seen:
                raise ConfigError(f"{key_node.start_mark.line + 1}: key {brief(key)} is given twice in one mapping "
                                  f"(first on line {seen[key]}); give each key once")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping from a file: duplicate keys, alias bombs and unreadable text refused in one line."""
    if "\0" in str(path):
        raise ConfigError(f"{brief(str(path))}: a file name cannot hold a NUL character")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except ConfigError as exc:  # a duplicate key: the message starts with its line
        raise ConfigError(f"{path}:{exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read ({exc})") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a config") from None
    except ValueError as exc:  # an integer of thousands of digits, say
        raise ConfigError(f"{path}: unreadable value ({brief(str(exc))})") from None
    check_size(data, str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top, got {type(data).__name__}")
    return data


def check_size(data: Any, where: str) -> None:
    """Refuse YAML whose aliases expand it beyond any config's size ("billion laughs": a few hundred bytes that
    stand for gigabytes once walked), counting without expanding."""
    count, stack = 0, [data]
    while stack:
        item = stack.pop()
        count += 1
        if count > MAX_VALUES:
            raise ConfigError(f"{where}: holds more than {MAX_VALUES:,} values once its YAML aliases are expanded; "
                              "a config needs no aliases")
        if isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
