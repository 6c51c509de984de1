"""Folders ceprompt creates (run directories, demo folders): marked, locked, and replaced safely.

* Every such folder holds a marker file, :data:`MARKER`. ``--overwrite`` replaces only a marked
  folder; anything else (``.``, a dataset, a home directory) is refused, with or without it.
* A folder being written holds an exclusive lock (``flock`` on :data:`LOCK`) for the life of the
  process, so a second writer (``--resume`` of a run that is still training, ``--overwrite`` of it)
  is refused with the holder's PID. The lock goes away with the process, even on SIGKILL, and its file
  with a process that ends normally.
* Replacing is staged: the old folder is renamed aside, the new one is created, and the old one is
  deleted only when the new one holds a result (:meth:`OwnedDir.commit`); on failure before that the
  new folder is removed and the old one renamed back (:meth:`OwnedDir.rollback`). A process killed
  in between leaves the old folder aside under a hidden name; the next start puts it back.
* A marked folder with no result yet (a start that failed during setup) is simply reused.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

from .errors import ConfigError
from .locks import PathLock, lock_holder

log = logging.getLogger(__name__)
MARKER = ".ceprompt-run"
LOCK = ".lock"
_ASIDE = re.compile(r"^\.(?P<name>.+)\.replaced-(?P<pid>\d+)-\d+$")

class DirLock(PathLock):
    """An exclusive, non-blocking lock on a folder (its :data:`LOCK` file, removed on release), released when closed
    or when the process ends."""

    def __init__(self, folder: Path) -> None:
        super().__init__(folder / LOCK, str(folder))
        self.folder = folder


def is_locked(folder: Path) -> str | None:
    """The PID holding ``folder``'s lock, or None when nobody does."""
    return lock_holder(folder / LOCK)


def is_owned(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OwnedDir:
    """A folder ceprompt is about to (re)create. :meth:`plan` checks, :meth:`open` acts."""

    def __init__(self, path: Path, kind: str, has_result: Callable[[Path], bool], overwrite: bool,
                 protected: Sequence[str | os.PathLike | None] = (), elsewhere: str = "choose another name") -> None:
        self.path = Path(path).expanduser()
        self.kind = kind  # "run directory", "demo folder": for messages
        self.elsewhere = elsewhere  # how the user names another folder, e.g. "choose another folder with --out"
        self.has_result = has_result
        self.overwrite = overwrite
        self.protected = [Path(p).expanduser().resolve() for p in protected if p]
        self.aside: Path | None = None
        self.lock: DirLock | None = None
        self.committed = False

    # -- checks, before anything is changed -------------------------------------------------------------

    def plan(self) -> "OwnedDir":
        """Refuse now (nothing touched) if the folder cannot be (re)created as asked."""
        self._recover_aside()
        p = self.path
        if p.exists() and not p.is_dir():
            raise ConfigError(f"{p}: exists and is a file; expected a {self.kind}")
        if not p.is_dir() or not any(x.name != LOCK for x in p.iterdir()):
            return self
        if not is_owned(p):
            raise ConfigError(f"{p}: exists, is not empty and was not created by ceprompt (no {MARKER} inside); "
                              f"ceprompt never replaces such a folder, even with --overwrite: {self.elsewhere}")
        holder = is_locked(p)
        if holder:
            raise ConfigError(f"{p}: in use by another ceprompt process (PID {holder})")
        if self.has_result(p) and not self.overwrite:
            hint = "continue it with --resume, " if self.kind == "run directory" else ""
            raise ConfigError(f"{p}: {self.kind} exists and is not empty; {hint}replace it with --overwrite, "
                              f"or {self.elsewhere}")
        resolved = p.resolve()
        for item in self.protected:
            if item == resolved or resolved in item.parents:
                raise ConfigError(f"{p}: replacing it would delete {item}, which this job reads; {self.elsewhere}")
        return self

    def _recover_aside(self) -> None:
        """A process killed between moving the old folder aside and finishing: undo or finish its work."""
        parent = self.path.parent
        if not parent.is_dir():
            return
        for candidate in parent.iterdir():
            m = _ASIDE.match(candidate.name)
            if not m or m.group("name") != self.path.name or _pid_alive(int(m.group("pid"))):
                continue
            if self.path.is_dir() and self.has_result(self.path):
                log.info("removing %s, the %s replaced by %s", candidate, self.kind, self.path)
                shutil.rmtree(candidate)
            else:
                if self.path.exists():
                    shutil.rmtree(self.path)
                log.warning("restoring %s, moved aside by an interrupted --overwrite", self.path)
                os.rename(candidate, self.path)

    # -- acting --------------------------------------------------------------------------------------------

    def open(self) -> Path:
        """Create (or stage the replacement of) the folder, lock it and mark it as ceprompt's."""
        p = self.path
        try:
            if p.is_dir() and any(x.name != LOCK for x in p.iterdir()):
                DirLock(p).acquire().release()  # still free: nobody started on it since plan()
                self.aside = p.parent / f".{p.name}.replaced-{os.getpid()}-{time.time_ns()}"
                os.rename(p, self.aside)
            p.mkdir(parents=True, exist_ok=True)
            self.lock = DirLock(p).acquire()
            (p / MARKER).write_text(f"{self.kind} created by ceprompt; --overwrite may replace this folder\n")
        except OSError as exc:
            self.rollback()
            raise ConfigError(f"{p}: cannot write the {self.kind} ({exc.strerror or exc})") from None
        return p

    @contextlib.contextmanager
    def replacing(self) -> Iterator[Path]:
        """:meth:`open`; the block fills the folder; :meth:`commit` when it ends, :meth:`rollback` if it raises."""
        folder = self.open()
        try:
            yield folder
        except BaseException:
            self.rollback()
            raise
        else:
            self.commit()
        finally:
            self.close()

    def commit(self) -> None:
        """The new folder holds a result: the old one (if any) can go."""
        if self.aside is not None and not self.committed:
            shutil.rmtree(self.aside, ignore_errors=True)
            self.aside = None
        self.committed = True

    def rollback(self) -> None:
        """Failure before :meth:`commit`: put the old folder back (the new one was ours and is removed)."""
        if self.committed or self.aside is None:
            return
        if self.path.exists():
            shutil.rmtree(self.path, ignore_errors=True)
        os.rename(self.aside, self.path)
        log.info("restored the previous %s %s", self.kind, self.path)
        self.aside = None

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None
