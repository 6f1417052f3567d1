"""The ``metaformer`` command line: one sub-command per module.

Each module named in :data:`VERBS` exposes ``add_parser(subparsers)``, which registers its verb(s) and
sets ``func`` (called with the parsed args, returning an exit code). A command line builds only its own
verb's parser (the other verbs are listed by name), so ``metaformer --help`` and ``--version`` import
no verb module, nor torch or timm, and the library stays importable without the training stack.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import warnings

from ..errors import MetaFormerError as UserError  # the one error class printed as a line
from .common import Parser, remember_parsers

# verb: (the module that builds it, its line in `metaformer --help`), in the order of that list (a module's
# verbs next to each other, in the order it registers them)
VERBS = {
    "info": ("info", "parameters and MACs of every variant (counted like the papers)"),
    "train": ("train", "train on an ImageNet-layout folder, shards, a Hugging Face dataset or the built-in digits"),
    "eval": ("evaluate", "top-1/top-5 accuracy of a model or checkpoint"),
    "predict": ("evaluate", "top-k labels with probabilities for images"),
    "data": ("data", "write the built-in digits or tar shards; check a --data source"),
    "export": ("export", "export to ONNX / TorchScript / torch.export / OpenVINO IR, then verify the file"),
    "cam": ("cam", "Grad-CAM heatmaps over images (last stage, as the authors did)"),
    "quantize": ("quantize", "static int8 with calibration, its top-1 cost measured; refused over --max-drop"),
    "serve": ("serve", "HTTP server: JSON API (/predict, /health, /info) and a web page with top-5 and Grad-CAM"),
    "convert": ("convert", "write a checkpoint in another layout (ours, the authors', timm's, Hugging Face's)"),
    "bench": ("bench", "benchmark inference and training against timm / ONNX Runtime"),
    "ablate": ("ablate", "rerun the paper's ablations (Table 5) as a resumable grid"),
    "detect": ("dense", "object detection: RetinaNet / Mask R-CNN (torchvision) on a MetaFormer"),
    "segment": ("dense", "semantic segmentation: Semantic FPN on a MetaFormer (ADE20K layout)"),
    "timm": ("timm_scripts", "run timm's train.py / validate.py with metaformer's models registered"),
}


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


class _Verbs:
    """The sub-command list a module's ``add_parser`` registers into: a verb's one-line help comes from
    :data:`VERBS`, so the full parser and the lazy one list the verbs alike."""

    def __init__(self, action: argparse._SubParsersAction):
        self.action = action

    def add_parser(self, name: str, **kwargs) -> argparse.ArgumentParser:
        return self.action.add_parser(name, help=VERBS[name][1], **kwargs)


def verb_of(argv: list[str]) -> str | None:
    """The verb a command line runs (its first word that is not an option), or None (``--help``, ``--version``,
    nothing, or a word that is no verb)."""
    first = next((a for a in argv if not a.startswith("-")), None)
    return first if first in VERBS else None


def build_parser(verbs=None) -> argparse.ArgumentParser:
    """The command line's parser with the modules of ``verbs`` built (default: every verb); any other verb is
    only listed, by name and help line."""
    parser = Parser(prog="metaformer", description="MetaFormer / PoolFormer models: build, train, evaluate, "
                    "predict, benchmark, export.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    wanted = {VERBS[v][0] for v in (VERBS if verbs is None else verbs)}
    built = set()
    for verb, (module, line) in VERBS.items():
        if module in wanted:
            if module not in built:
                importlib.import_module(f"{__name__}.{module}").add_parser(_Verbs(sub))
                built.add(module)
        else:
            sub.add_parser(verb, help=line, add_help=False)
    remember_parsers(parser)
    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    # Our warnings are sentences for the user; the file and line of the warn() call only distract.
    print(f"warning: {message}", file=file if file is not None else sys.stderr)


def report_error(line: str) -> None:
    """Print the one-line error, once. Under torchrun every rank usually meets the same error (the same options,
    data and output): rank 0 prints it, every rank hands it to torchrun's error file (so torchrun's failure report
    shows it as the root cause, a rank's own error included), and the process group is left before the process
    exits (else gloo aborts the process at exit: "terminate called without an active exception")."""
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        print(line, file=sys.stderr)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:  # torchrun's format, with the line where it shows a worker's traceback
        import json
        import time

        info = {"py_callstack": line, "timestamp": str(int(time.time()))}
        with contextlib.suppress(OSError):
            with open(error_file, "w") as f:
                json.dump({"message": {"message": line, "extraInfo": info}}, f)
    dist = sys.modules.get("torch.distributed")  # imported only if the command started a process group
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    """Run one command line (``argv``, default ``sys.argv[1:]``) and return its exit code. The process is left
    as it was found: warnings are shown as one line only while the command runs."""
    argv = sys.argv[1:] if argv is None else list(argv)
    verb = verb_of(argv)
    parser = build_parser([verb] if verb else [])
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # answered by the verb's own parser, with its usage (argparse would show the top level's)
        args._parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    with warnings.catch_warnings():  # restores warnings.showwarning on the way out
        warnings.showwarning = _one_line_warning
        try:
            return int(args.func(args) or 0)
        except UserError as e:
            report_error(f"metaformer {args.command}: error: {e.cli_message(args)}")
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        except BrokenPipeError:  # `metaformer info | head`: the reader left; not an error of ours
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0


# Verbs that run until stopped. Keeping every freed block makes a long-lived process hold its largest burst
# forever (a server after 16 concurrent 40 M pixel uploads: its peak, not its working set), so they keep
# glibc's defaults and give memory back themselves.
LONG_LIVED = {"serve"}


def program() -> None:
    """The ``metaformer`` executable (and ``python -m metaformer``): a process of its own, so it may set up
    the process for the work it does. Large activations are reused instead of being page-faulted in on
    every step (:func:`metaformer.fast.alloc.keep_freed_memory`; ``METAFORMER_MALLOC=default`` keeps
    glibc's defaults), except by the verbs of :data:`LONG_LIVED`. ``main()`` called from Python changes no
    process-wide setting."""
    verb = verb_of(sys.argv[1:])
    if verb and verb not in LONG_LIVED:  # not for --help or --version, which import neither torch nor the fast paths
        from ..fast.alloc import keep_freed_memory

        keep_freed_memory()
    raise SystemExit(main())
