"""Small file helpers shared by every writer and loader: atomic replacement, hashing, the cache folder."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
from pathlib import Path
from typing import Iterator

from .schema import read_json

log = logging.getLogger(__name__)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()  # read once, at import: os.umask can only be read by setting it


@contextlib.contextmanager
def atomic_write(dst: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``dst``; on success it replaces ``dst`` in one rename.

    A process killed mid-write leaves the previous ``dst`` untouched (only a stray
    ``.tmp`` file), so a checkpoint on disk is always either the old or the new one.
    The file gets the usual permissions (0666 minus the umask), not mkstemp's 0600.
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.{secrets.token_hex(4)}.tmp"
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # writers that replace the file themselves (safetensors) leave it 0600
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_write_set(files: list[Path], commit: Path) -> Iterator[dict[Path, Path]]:
    """:func:`atomic_write` for files that belong together (weights and their description): yields a
    temporary path per file; on success the old ``commit`` file (the one readers go by) is removed first, the
    others are renamed into place, and ``commit`` last. A process killed at any point leaves either the old set,
    or a set without its ``commit`` file, which no reader takes for a whole one; never a mix."""
    with contextlib.ExitStack() as stack:
        temps = {dst: stack.enter_context(_temporary_beside(dst)) for dst in files}
        yield temps
        for tmp in temps.values():
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o666 & ~_UMASK)
        if commit.exists():
            commit.unlink()
        for dst, tmp in temps.items():
            if dst != commit:
                os.replace(tmp, dst)
        os.replace(temps[commit], commit)


@contextlib.contextmanager
def _temporary_beside(dst: Path) -> Iterator[Path]:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.{secrets.token_hex(4)}.tmp"
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        yield tmp
    finally:
        if tmp.exists():
            tmp.unlink()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def cache_dir() -> Path:
    """``$CEPROMPT_CACHE``, else ``$XDG_CACHE_HOME/ceprompt``, else ``~/.cache/ceprompt``."""
    if os.environ.get("CEPROMPT_CACHE"):
        return Path(os.environ["CEPROMPT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ceprompt"


def content_files(path: Path) -> list[Path]:
    """The files whose bytes make a model: the file itself, or a Hugging Face folder's config and weights."""
    if path.is_file():
        return [path]
    names = ("config.json", "model.safetensors", "pytorch_model.bin")
    return [path / n for n in names if (path / n).is_file()]


def verified_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file (or a model folder's files), remembered by size, modification and change time and inode,
    so that a 600 MB backbone is hashed once, not at every load. Any change to the file changes its key."""
    path = Path(path).resolve()
    files = content_files(path)
    # inode and ctime too: cp -p, rsync -t and tar restore a replaced file's size and mtime, never its ctime
    key = json.dumps([[str(f), st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]
                      for f in files for st in [f.stat()]])
    store = cache_dir() / "hashes.json"
    try:
        known = read_json(store.read_bytes(), str(store))  # a poisoned cache is dropped, not a traceback
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict):
        known = {}
    if isinstance(known.get(key), str):
        return known[key]
    if len(files) == 1 and files[0] == path:
        value = sha256_file(path)
    else:
        digest = hashlib.sha256()
        for f in files:
            digest.update(f.name.encode() + b"\0" + sha256_file(f).encode())
        value = digest.hexdigest()
    known[key] = value
    try:
        with atomic_write(store) as tmp:
            tmp.write_text(json.dumps(dict(list(known.items())[-512:])))
    except OSError as exc:  # a read-only cache only costs time
        log.debug("cannot update %s (%s)", store, exc)
    return value


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(value: object) -> object:
    """A CSV cell that a spreadsheet will not run: text starting like a formula gets a leading ``'`` (numbers,
    negative ones included, are left as they are)."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value
