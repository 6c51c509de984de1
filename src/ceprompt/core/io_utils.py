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

log = logging.getLogger(__name__)


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
        os.replace(tmp, dst)
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
    """SHA-256 of a file (or a model folder's files), remembered by size and modification time so that a
    600 MB backbone is hashed once, not at every load. Any change to the file changes its key."""
    path = Path(path).resolve()
    files = content_files(path)
    key = json.dumps([[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files])
    store = cache_dir() / "hashes.json"
    try:
        known = json.loads(store.read_text())
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
