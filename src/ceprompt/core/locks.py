"""Exclusive locks between ceprompt processes, on lock files that exist only while they are held.

A lock is an ``flock`` on a small file that records the holder's PID: the system releases it when the process
ends, even on SIGKILL, so a lock is never stale. The holder removes the file when it releases the lock; taking a
lock checks, once held, that the file is still the one at its path (another holder may have removed it in between),
so two processes can never both believe they hold it.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ConfigError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; a second writer is not detected there
    fcntl = None  # type: ignore[assignment]


def _try_lock(fd: int) -> bool:
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _holder_pid(path: Path) -> str:
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


class PathLock:
    """An exclusive lock held through the file ``path`` (created, and removed again on release)."""

    def __init__(self, path: Path, what: str) -> None:
        self.path, self.what = Path(path), what  # what: the locked thing, for messages ("output out.csv")
        self.fd: int | None = None

    def acquire(self) -> "PathLock":
        for _ in range(8):  # another holder may remove the file between our open and our lock: open it again
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise ConfigError(f"{self.what}: cannot create its lock file {self.path} "
                                  f"({exc.strerror or exc})") from None
            if not _try_lock(fd):
                os.close(fd)
                raise ConfigError(f"{self.what}: in use by another ceprompt process (PID {_holder_pid(self.path)}); "
                                  "wait for it to finish or stop it first")
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self.fd = fd
                return self
            os.close(fd)
        raise ConfigError(f"{self.what}: its lock file {self.path} keeps changing; is another process deleting it?")

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still held: nobody can take the file we remove
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "PathLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_holder(path: Path) -> str | None:
    """The PID holding the lock file ``path``, or None when nobody does (a file left by a killed process)."""
    if not path.is_file():
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        if _try_lock(fd):
            return None  # closing the descriptor releases the lock taken here
        return _holder_pid(path)
    finally:
        os.close(fd)
