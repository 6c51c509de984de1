"""The ``ceprompt`` command: one verb per job, each implemented in its own module.

Errors the user can fix (:class:`~ceprompt.errors.CepromptError`) are printed as one
line and exit with status 1; argument mistakes exit with status 2 (argparse).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Sequence

from . import __version__
from .errors import CepromptError

Handler = Callable[[argparse.Namespace], int]


def _cmd_convert(args: argparse.Namespace) -> int:
    from .clip_files import convert_clip

    act = {"auto": None, "quickgelu": True, "gelu": False}[args.activation]
    loaded = convert_clip(args.src, args.dst, overwrite=args.overwrite, quick_gelu=act)
    print(f"{args.src} ({loaded.format}): {loaded.spec.describe()}")
    print(f"wrote {args.dst} and {args.dst.rsplit('.', 1)[0]}.json")
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import run_doctor

    return run_doctor(args.arch)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ceprompt",
        description="CEPrompt facial expression recognition on CLIP: train, evaluate, predict.",
    )
    parser.add_argument("--version", action="version", version=f"ceprompt {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    p = verbs.add_parser("convert", help="copy a CLIP checkpoint (any format) to safetensors + JSON sidecar")
    p.add_argument("src", help="OpenAI .pt archive, state dict (.pt/.bin/.safetensors) or Hugging Face folder")
    p.add_argument("dst", help="output file ending in .safetensors")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--activation", choices=["auto", "quickgelu", "gelu"], default="auto",
                   help="MLP activation where the file does not record it (auto: QuickGELU, as OpenAI's)")
    p.set_defaults(handler=_cmd_convert)

    p = verbs.add_parser("doctor", help="report versions and devices; round-trip a tiny CLIP through every format")
    p.add_argument("--arch", default="tiny-vit", help="architecture to round-trip (default: tiny-vit)")
    p.set_defaults(handler=_cmd_doctor)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    handler: Handler = args.handler
    try:
        return handler(args)
    except CepromptError as exc:
        print(f"ceprompt {args.verb}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"ceprompt {args.verb}: interrupted", file=sys.stderr)
        return 130
