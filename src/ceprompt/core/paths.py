"""The one output-path policy: outputs are checked before work starts and confined where they belong.

* :func:`output_file` / :func:`output_dir` - called by every command before it loads a model or reads
  data: a file must not be a folder (and the reverse), must not already exist unless the user said
  ``--overwrite``, and its folder must be creatable and writable.
* :func:`confined` - a path built from data (an index line, a file name) must stay inside its root:
  absolute paths and ``..`` that leave the root are refused.
* :func:`file_stem` - names derived from input files fit every file system (255 bytes per name).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import ConfigError

NAME_BYTES = 120  # generated names stay well under the usual 255-byte limit, with room for suffixes


def escapes(relative: str) -> bool:
    """True for absolute paths and for paths whose ``..`` parts climb above their starting folder."""
    if os.path.isabs(relative) or (os.name == "nt" and os.path.splitdrive(relative)[0]):
        return True
    depth = 0
    for part in Path(relative).parts:
        if part == "..":
            depth -= 1
            if depth < 0:
                return True
        elif part not in ("", "."):
            depth += 1
    return False


def confined(root: str | os.PathLike, relative: str, what: str = "path") -> Path:
    """``root / relative``, refusing paths that would leave ``root``."""
    if escapes(relative):
        raise ConfigError(f"{what} {relative!r} leaves {root}; only paths inside it are allowed")
    return Path(root) / relative


def _check_writable_folder(folder: Path, label: str) -> None:
    blocker = _first_file(folder)
    if blocker is not None:
        raise ConfigError(f"{label}: {blocker} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise ConfigError(f"{label}: cannot write in {folder} ({exc.strerror or exc})") from None


def _first_file(folder: Path) -> Path | None:
    """The first part of ``folder``'s path that exists and is not a folder, if any."""
    for parent in [folder, *folder.parents]:
        if parent.exists() and not parent.is_dir():
            return parent
    return None


def output_file(path: str | os.PathLike, overwrite: bool = False, option: str = "output") -> Path:
    """Check (and prepare the folder of) a file the command will write; nothing is written to it."""
    path = Path(path).expanduser()
    label = f"{option} {path}"
    if "\0" in str(path):
        raise ConfigError(f"{option}: a file name cannot hold a NUL character")
    link = path.is_symlink()
    if path.is_dir() and not link:
        raise ConfigError(f"{label}: is a folder; expected a file name")
    if path.exists() and not link and not path.is_file():  # a device, a FIFO: --overwrite must never replace one
        raise ConfigError(f"{label}: is not a regular file (a device or FIFO); expected a file name")
    if os.path.lexists(path) and not overwrite:  # a symbolic link, even a dangling one, is something the user has
        raise ConfigError(f"{label}: already exists{' (a symbolic link)' if link else ''}; pass --overwrite (which "
                          f"replaces {'the link itself, not the file it points to' if link else 'it'}) or choose "
                          "another name")
    _check_writable_folder(path.parent if str(path.parent) else Path("."), label)
    if path.exists() and not link and not os.access(path, os.W_OK):
        raise ConfigError(f"{label}: exists and is read-only")
    return path


def output_dir(path: str | os.PathLike, option: str = "output folder", must_be_empty: bool = False,
               overwrite: bool = False) -> Path:
    """Check (and create) a folder the command will write files into."""
    path = Path(path).expanduser()
    label = f"{option} {path}"
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{label}: is a file; expected a folder")
    if must_be_empty and not overwrite and path.is_dir() and any(path.iterdir()):
        raise ConfigError(f"{label}: exists and is not empty; pass --overwrite or choose another folder")
    _check_writable_folder(path, label)
    return path


def file_stem(name: str, limit: int = NAME_BYTES) -> str:
    """``name`` shortened (with a hash of the whole, to stay unique) when its UTF-8 form is too long."""
    raw = os.fsencode(name)
    if len(raw) <= limit:
        return name
    digest = hashlib.sha256(raw).hexdigest()[:10]
    head = raw[: limit - 11].decode("utf-8", "ignore")
    return f"{head}-{digest}"


def shown(path: str | os.PathLike) -> str:
    """A path for a log line: absolute, with the home folder as ``~`` (never a ``../../..`` climb)."""
    full = os.path.abspath(os.fspath(path))
    home = os.path.expanduser("~")
    return "~" + full[len(home):] if home not in ("", "/") and (full + os.sep).startswith(home + os.sep) else full


@contextlib.contextmanager
def removed_on_failure(path: str | os.PathLike) -> Iterator[None]:
    """The folders of ``path`` that do not exist yet (an output folder the block creates) are removed again when
    the block fails, with what it wrote into them: a failed command leaves no folder behind."""
    full = Path(os.path.abspath(Path(path).expanduser()))
    missing = [p for p in [full, *full.parents] if not p.exists()]
    try:
        yield
    except BaseException:
        if missing:  # what this block created holds only what it wrote (a report cut short by a full disk)
            shutil.rmtree(missing[0], ignore_errors=True)
        for folder in missing[1:]:
            try:
                folder.rmdir()
            except OSError:  # not empty: leave it
                break
        raise
