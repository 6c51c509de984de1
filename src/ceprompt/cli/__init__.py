"""The ``ceprompt`` command: one verb per job (options in :mod:`.parser`, what each verb does in :mod:`.commands`,
the work itself in the package's modules).

Errors the user can fix (:class:`~ceprompt.core.errors.CepromptError`) are printed as one
line and exit with status 1; argument mistakes exit with status 2 (argparse).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from typing import Callable, Iterator, Sequence

from ..core.errors import CepromptError
from .parser import DEFAULT_MIN_FACE, build_parser

__all__ = ["DEFAULT_MIN_FACE", "build_parser", "main"]
Handler = Callable[[argparse.Namespace], int]

def _quiet_stdout() -> None:
    """After a failed write to stdout, point it at /dev/null: Python's flush at exit would fail again, loudly."""
    try:
        sys.stdout.flush()
    except OSError:
        sys.stdout = open(os.devnull, "w")


def _set_hint(unknown: Sequence[str], args: argparse.Namespace) -> str:
    """For ``train --epochs 3``: the config key it may mean, to be given with --set."""
    if getattr(args, "verb", None) != "train":
        return ""
    from ..core.config import dotted
    from ..experiment.config import Config

    keys = dotted(Config().to_dict())
    for option in unknown:
        name = option.lstrip("-").split("=", 1)[0].replace("-", "_")
        matches = [k for k in keys if k.rsplit(".", 1)[-1] == name]
        if option.startswith("--") and matches:
            return f" (config values are given with --set, e.g. --set {matches[0]}=...)"
    return ""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's stop, ``kill``), raised like Ctrl-C so that the same clean-up runs: temporary files
    removed, finished work kept for a rerun, nothing left that looks complete."""


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminated(signum: int, frame: object) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    if not (sys.argv[1:] if argv is None else list(argv)):  # plain `ceprompt`: what it can do
        parser.print_help()
        return 0
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # the verb's own usage, not the top-level one, and the config key a stray option may mean
        verb_parser = getattr(args, "verb_parser", parser)
        verb_parser.error(f"unrecognized arguments: {' '.join(unknown)}{_set_hint(unknown, args)}")
    # ceprompt's own messages at INFO; other libraries (onnxscript, onnx_ir, ...) only when they warn
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("ceprompt").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    handler: Handler = args.handler
    from ..data.images import pixel_limit

    try:
        with _sigterm_raises(), pixel_limit(getattr(args, "max_pixels", None)):
            return handler(args)
    except CepromptError as exc:
        print(f"ceprompt {args.verb}: error: {exc}", file=sys.stderr)
        _quiet_stdout()
        return 1
    except OSError as exc:  # the system refused a write or a read: a full disk, a closed pipe, a lost mount
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"ceprompt {args.verb}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        _quiet_stdout()
        return 1
    except KeyboardInterrupt as exc:
        print(f"ceprompt {args.verb}: {'terminated (SIGTERM)' if isinstance(exc, Terminated) else 'interrupted'}",
              file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
