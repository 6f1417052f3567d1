"""What every verb's command line shares: one parser class (defaults shown once, errors with the verb's
own usage) and one vocabulary of flags (``--output``, ``--checkpoint``, ``--device``, ``--batch-size``,
``--workers``, ``--amp``, ``--json``), each with the same spelling and meaning in every verb."""
from __future__ import annotations

import argparse
import contextlib
import json
import sys

from ..ranges import BATCH, WORKERS, Range

AMP_CHOICES = ("auto", "none", "bf16", "fp16")


def _worth_showing(default) -> bool:
    # identity, not equality: a default of 0 is worth showing, False (a plain switch) and None are not
    return not (default is None or default is False or default is argparse.SUPPRESS)


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Appends ``(default: X)`` to an option's help once: when it has a default worth showing and its help
    does not already say what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or "default" in text or not _worth_showing(action.default)
                or isinstance(action, (argparse._HelpAction, argparse._VersionAction))):
            return text
        return text + " (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` with :class:`Formatter`; sub-commands built from it use it too."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", Formatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        action = super().add_argument(*args, **kwargs)
        if isinstance(action.type, Range) and action.type.describe() not in (action.help or ""):
            # a number checked as it is parsed: say what it takes
            action.help = f"{action.help} ({action.type.describe()})" if action.help else action.type.describe()
        if action.option_strings and not action.help and _worth_showing(action.default):
            action.help = "(default: %(default)s)"  # argparse prints nothing, not even the default, without a help
        return action


def remember_parsers(parser: argparse.ArgumentParser) -> None:
    """Give every (sub-)command's namespace its own parser, so an error is answered with that verb's usage."""
    parser.set_defaults(_parser=parser)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in set(action.choices.values()):
                remember_parsers(sub)


def add_output(p, default: str | None, what: str) -> None:
    if default is None:
        p.add_argument("--output", "-o", required=True, help=what)
    else:
        p.add_argument("--output", "-o", default=default, help=what)


def add_run_folder(p, default: str, holds: str) -> None:
    """A training run's folder (``holds``: what the run writes there): refused when it holds a run, unless resumed
    or overwritten."""
    add_output(p, default, f"run folder: {holds}")
    p.add_argument("--resume", metavar="CKPT|auto", help="continue from a checkpoint ('auto': OUTPUT/last.pth "
                   "when there is one)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in --output (else refused "
                   "unless --resume)")


def add_checkpoint(p, required: bool = False, what: str = "weights: any layout metaformer loads") -> None:
    p.add_argument("--checkpoint", required=required, help=what)


def add_device(p) -> None:
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available; under torchrun, one GPU "
                                    "per local rank)")


def add_amp(p, default: str = "auto") -> None:
    p.add_argument("--amp", choices=AMP_CHOICES, default=default,
                   help="mixed precision: auto is bf16 on GPU and off on CPU")


def add_batch_size(p, default: int | None, what: str = "images per process") -> None:
    p.add_argument("--batch-size", "-b", type=BATCH, default=default, help=what)


def add_workers(p, default: int = 2) -> None:
    p.add_argument("--workers", "-j", type=WORKERS, default=default, help="data-loading worker processes")


def add_json(p, what: str = "print the result as JSON instead of a summary") -> None:
    p.add_argument("--json", action="store_true", help=what)


def logs_to_stderr(json_output: bool):
    """Under ``--json``, the run's log lines go to stderr, so stdout holds the JSON alone."""
    return contextlib.redirect_stdout(sys.stderr) if json_output else contextlib.nullcontext()


def print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")
