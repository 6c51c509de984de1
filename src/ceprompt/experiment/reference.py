"""README's configuration reference, generated from the config dataclasses so that it cannot drift: every key,
its default, what it accepts and the comment beside its field, wherever its section is defined (the run's sections
in :mod:`ceprompt.experiment.config`, ``head``, ``eva`` and ``cat`` beside what they configure in ``model/``).

    python -m ceprompt.experiment.reference            # print the table
    python -m ceprompt.experiment.reference README.md  # replace the table between its markers
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import io
import sys
import tokenize
import typing
from pathlib import Path
from typing import Any

from ..core.config import allows_none, field_choices, field_range
from .config import Config

START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


@functools.cache
def _field_comments(source_file: str) -> dict[tuple[str, str], str]:
    """``(class name, field) -> comment`` from a source file: the comment on the field's line and the indented
    comment lines that continue it."""
    source = Path(source_file).read_text()
    comments: dict[tuple[str, str], str] = {}
    cls, last = None, None
    lines = source.splitlines()
    for number, line in enumerate(lines):
        stripped = line.strip()
        if not stripped:
            last = None  # a comment after a blank line is not the field's
        if line.startswith("class "):
            cls, last = line.split()[1].split("(")[0].rstrip(":"), None
        elif cls and line.startswith("    ") and not line.startswith("     ") and ":" in stripped \
                and not stripped.startswith(("#", "def ", "@", '"')):
            name = stripped.split(":")[0]
            comment = _comment_of(line)
            if name.isidentifier() and comment is not None:
                comments[(cls, name)] = comment
                last = (cls, name)
            else:
                last = None
        elif last and stripped.startswith("#") and line.startswith("    #"):
            comments[last] += " " + stripped.lstrip("#").strip()
        elif not line.startswith("    "):
            cls = cls if line.strip() == "" else None
    return comments


def _comment_of(line: str) -> str | None:
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(line.strip() + "\n").readline))
    except (tokenize.TokenError, IndentationError):
        return None
    found = [t.string for t in tokens if t.type == tokenize.COMMENT]
    return found[0].lstrip("#").strip() if found else None


def _default(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f'"{value}"' if value else '""'
    return str(value)


def _accepts(f: dataclasses.Field, annotation: Any) -> str:
    allowed, choices = field_range(f), field_choices(f)
    if allowed is not None:
        text = allowed.describe()
        if typing.get_origin(annotation) is list:
            text = f"a list of numbers, each {text.removeprefix('a number ').removeprefix('an integer ')}"
        return text + (", or null (off)" if allows_none(annotation) else "")
    if choices is not None:
        listed = ", ".join(f"`{c}`" for c in choices)
        text = f"a list of {listed}" if typing.get_origin(annotation) is list else f"one of {listed}"
        return text + (", or null" if allows_none(annotation) else "")
    options = typing.get_args(annotation) or (annotation,)
    names = {bool: "true or false", str: "text", int: "an integer", float: "a number"}
    parts = [names.get(o, "a list" if typing.get_origin(o) is list else str(o)) for o in options if o is not type(None)]
    if type(None) in options:
        parts.append("null")
    return " or ".join(dict.fromkeys(parts))


def _comment(cls: type, name: str) -> str:
    return _field_comments(inspect.getsourcefile(cls)).get((cls.__name__, name), "").replace("|", "\\|")


def markdown() -> str:
    defaults = Config()
    rows = ["| key | default | accepts | meaning |", "|---|---|---|---|"]
    top = typing.get_type_hints(Config)
    for section in dataclasses.fields(Config):
        value = getattr(defaults, section.name)
        if not dataclasses.is_dataclass(value):
            rows.append(f"| `{section.name}` | `{_default(value)}` | {_accepts(section, top[section.name])} | "
                        f"{_comment(Config, section.name)} |")
            continue
        hints = typing.get_type_hints(type(value))
        for f in dataclasses.fields(value):
            rows.append(f"| `{section.name}.{f.name}` | `{_default(getattr(value, f.name))}` | "
                        f"{_accepts(f, hints[f.name])} | {_comment(type(value), f.name)} |")
    return "\n".join(rows) + "\n"


def replace_in(path: Path) -> bool:
    """Write the table between README's markers; True when it changed."""
    text = path.read_text()
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    new = f"{head}{START}\n{markdown()}{END}{tail}"
    if new != text:
        path.write_text(new)
    return new != text


if __name__ == "__main__":
    if len(sys.argv) > 1:
        print("updated" if replace_in(Path(sys.argv[1])) else "up to date")
    else:
        print(markdown(), end="")
