"""The one output policy for what a verb writes: files and folders of pictures.

* **Checked before work starts** (:func:`~ceprompt.core.paths.output_file`, :func:`~ceprompt.core.paths.output_dir`):
  what exists (a symbolic link too, dangling or not) is not replaced without ``--overwrite``.
* **Claimed** for the whole run: a lock beside the output (``.NAME.ceprompt-lock``) that a second run writing the same
  output cannot take, so two runs never both believe they own one file.
* **Written beside, then renamed**: a file appears complete or not at all. A run that fails or is interrupted leaves
  no file that looks like a result (only a hidden temporary if it was killed outright); the rename replaces a
  symbolic link itself, never the file it points to.
* **Folders of pictures** hold a ``.ceprompt-incomplete`` marker from the first picture until the last: a folder
  that still holds it was cut short. Each picture is written beside and renamed like a file.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from .errors import CepromptError, ConfigError
from .io_utils import atomic_write
from .locks import PathLock
from .paths import output_dir, output_file

if TYPE_CHECKING:
    from PIL import Image

INCOMPLETE = ".ceprompt-incomplete"


def lock_path(path: Path) -> Path:
    return path.parent / f".{path.name}.ceprompt-lock"


class OutputFile:
    """A file a verb writes (checked when made, claimed by :meth:`claim`, written with :meth:`writing`)."""

    def __init__(self, path: str | os.PathLike, overwrite: bool = False, option: str = "output") -> None:
        self.path = output_file(path, overwrite, option)
        self.overwrite, self.option = overwrite, option
        self.lock: PathLock | None = None

    def claim(self) -> "OutputFile":
        """Hold the output for this run; refused when another run holds it or it appeared since the check."""
        if self.lock is None:
            self.lock = PathLock(lock_path(self.path), f"{self.option} {self.path}").acquire()
            try:
                output_file(self.path, self.overwrite, self.option)  # another run may have finished it meanwhile
            except ConfigError:
                self.release()
                raise
        return self

    @contextlib.contextmanager
    def writing(self) -> Iterator[Path]:
        """A temporary path beside the output; renamed into place when the block succeeds, removed if it fails."""
        self.claim()
        with atomic_write(self.path) as tmp:
            yield tmp

    def write_with(self, write: Callable[[Path], object]) -> Path:
        with self.writing() as tmp:
            write(tmp)
        return self.path

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def __enter__(self) -> "OutputFile":
        return self.claim()

    def __exit__(self, *exc: object) -> None:
        self.release()


def distinct_outputs(*outputs: tuple[str, str | os.PathLike | None]) -> None:
    """Refuse two options naming the same file (``embed -o x.png --plot x.png`` would replace one by the other)."""
    seen: dict[str, str] = {}
    for option, path in outputs:
        if path is None or str(path) == "-":
            continue
        key = os.path.normcase(os.path.abspath(os.path.expanduser(os.fspath(path))))
        if key in seen:
            raise ConfigError(f"{seen[key]} and {option} name the same file {path}; give each its own")
        seen[key] = option


class PictureFolder:
    """A folder a verb writes pictures into (``--annotate``, ``--explain``, ``--timeline``)."""

    def __init__(self, path: str | os.PathLike, option: str, overwrite: bool = False) -> None:
        self.path = output_dir(path, option, must_be_empty=True, overwrite=overwrite)
        self.option = option
        self.lock: PathLock | None = None
        self.joined = False

    def join(self) -> "PictureFolder":
        """Write into a folder another process of the same job holds (torchrun's other ranks)."""
        self.joined = True
        return self

    def claim(self) -> "PictureFolder":
        """Hold the folder for this run and mark it incomplete until :meth:`finish`."""
        if self.lock is None and not self.joined:
            self.lock = PathLock(lock_path(self.path), f"{self.option} {self.path}").acquire()
            (self.path / INCOMPLETE).write_text("this folder's pictures were cut short (a ceprompt run failed or was "
                                                "interrupted); run it again\n")
        return self

    @contextlib.contextmanager
    def writing(self, name: str) -> Iterator[Path]:
        """A temporary path for the file ``name`` in the folder, renamed into place when the block succeeds."""
        self.claim()
        target = self.path / name
        if target.parent != self.path:
            raise ConfigError(f"{self.option}: {name!r} is not a plain file name")
        with atomic_write(target) as tmp:
            yield tmp

    def save_file(self, name: str, write: Callable[[Path], object]) -> Path:
        """Write the file ``name`` in the folder through ``write(temporary path)``; a failure to write is one line
        naming the file."""
        try:
            with self.writing(name) as tmp:
                write(tmp)
        except OSError as exc:
            raise CepromptError(f"cannot write {self.path / name} ({exc.strerror or exc})") from None
        return self.path / name

    def save(self, name: str, image: "Image.Image") -> Path:
        """A picture as PNG."""
        return self.save_file(name, lambda tmp: image.save(tmp, format="PNG"))

    def finish(self) -> None:
        """Every picture is written: the folder is complete."""
        if self.lock is not None:
            (self.path / INCOMPLETE).unlink(missing_ok=True)
        self.release()

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def save_figure(fig: "Any", path: str | os.PathLike, dpi: int) -> Path:
    """A matplotlib figure as a PNG at ``path``, written beside it and renamed (a full disk leaves no truncated
    picture under the name), and the figure closed either way."""
    import matplotlib.pyplot as plt

    try:
        with atomic_write(Path(path)) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        plt.close(fig)
    return Path(path)
