"""The ``metaformer`` command line: one sub-command per module.

Each module named in ``COMMANDS`` exposes ``add_parser(subparsers)``, which registers its
sub-command(s) and sets ``func`` (called with the parsed args, returning an exit code).
Modules are imported only when listed, so the library stays importable without the
training stack.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

from ..errors import MetaFormerError as UserError  # the one error class printed as a line
from .common import Parser, remember_parsers

COMMANDS = [
    "metaformer.cli.info",
    "metaformer.cli.dense",
    "metaformer.cli.bench",
    "metaformer.cli.train",
    "metaformer.cli.evaluate",
    "metaformer.cli.export",
    "metaformer.cli.quantize",
    "metaformer.cli.serve",
    "metaformer.cli.ablate",
    "metaformer.cli.data",
    "metaformer.cli.convert",
    "metaformer.cli.timm_scripts",
]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    from .. import __version__

    found = []
    for dist in ("torch", "torchvision", "timm"):
        try:
            found.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            pass
    return f"metaformer {__version__} ({', '.join(found)})"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="metaformer", description="MetaFormer / PoolFormer models: build, train, evaluate, "
                    "predict, benchmark, export.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(name).add_parser(sub)
    remember_parsers(parser)
    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    # Our warnings are sentences for the user; the file and line of the warn() call only distract.
    print(f"warning: {message}", file=file if file is not None else sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run one command line (``argv``, default ``sys.argv[1:]``) and return its exit code. The process is left
    as it was found: warnings are shown as one line only while the command runs."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # answered by the verb's own parser, with its usage (argparse would show the top level's)
        args._parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    with warnings.catch_warnings():  # restores warnings.showwarning on the way out
        warnings.showwarning = _one_line_warning
        try:
            return int(args.func(args) or 0)
        except UserError as e:
            print(f"metaformer {args.command}: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        except BrokenPipeError:  # `metaformer info | head`: the reader left; not an error of ours
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0


def program() -> None:
    """The ``metaformer`` executable (and ``python -m metaformer``): a process of its own, so it may set up
    the process for the work it does. Large activations are reused instead of being page-faulted in on
    every step (:func:`metaformer.fast.alloc.keep_freed_memory`; ``METAFORMER_MALLOC=default`` keeps
    glibc's defaults). ``main()`` called from Python changes no process-wide setting."""
    from ..fast.alloc import keep_freed_memory

    keep_freed_memory()
    raise SystemExit(main())
