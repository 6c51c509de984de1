"""README's configuration reference, generated from the config dataclasses so that it cannot drift: every key,
its default, what it accepts and the comment beside its field in :mod:`ceprompt.core.config`.

    python -m ceprompt.core.config_reference            # print the table
    python -m ceprompt.core.config_reference README.md  # replace the table between its markers
"""

from __future__ import annotations

import dataclasses
import io
import sys
import tokenize
import typing
from pathlib import Path
from typing import Any

from . import config

START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def _field_comments() -> dict[tuple[str, str], str]:
    """``(class name, field) -> comment`` from the source: the comment on the field's line and the indented
    comment lines that continue it."""
    source = Path(config.__file__).read_text()
    comments: dict[tuple[str, str], str] = {}
    cls, last = None, None
    lines = source.splitlines()
    for number, line in enumerate(lines):
        stripped = line.strip()
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


def _accepts(key: str, annotation: Any) -> str:
    if key in config.RANGES:
        text = config.RANGES[key].describe()
        if typing.get_origin(annotation) is list:
            text = f"a list of numbers, each {text.removeprefix('a number ').removeprefix('an integer ')}"
        return text + (", or null (off)" if key in config.NULLABLE else "")
    options = typing.get_args(annotation) or (annotation,)
    names = {bool: "true or false", str: "text", int: "an integer", float: "a number"}
    parts = [names.get(o, "a list" if typing.get_origin(o) is list else str(o)) for o in options if o is not type(None)]
    if type(None) in options:
        parts.append("null")
    return " or ".join(dict.fromkeys(parts))


def markdown() -> str:
    comments = _field_comments()
    defaults = config.Config()
    rows = ["| key | default | accepts | meaning |", "|---|---|---|---|"]
    top = typing.get_type_hints(config.Config)
    for section in dataclasses.fields(config.Config):
        value = getattr(defaults, section.name)
        if not dataclasses.is_dataclass(value):
            meaning = comments.get(("Config", section.name), "")
            rows.append(f"| `{section.name}` | `{_default(value)}` | {_accepts(section.name, top[section.name])} | "
                        f"{meaning} |")
            continue
        hints = typing.get_type_hints(type(value))
        for f in dataclasses.fields(value):
            key = f"{section.name}.{f.name}"
            meaning = comments.get((type(value).__name__, f.name), "").replace("|", "\\|")
            rows.append(f"| `{key}` | `{_default(getattr(value, f.name))}` | {_accepts(key, hints[f.name])} | "
                        f"{meaning} |")
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
