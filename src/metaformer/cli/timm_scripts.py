"""``metaformer timm SCRIPT ...``: run one of timm's scripts (train.py, validate.py, inference.py) with our
models registered, so ``--model metaformer_poolformer_s12`` (or any ``metaformer_*`` name) builds ours."""
from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

from . import UserError


CLONE = "pytorch-image-models"  # the folder `git clone` makes, where a bare script name is also looked for


def clone_command() -> str:
    """The clone of timm's repository at the installed version's tag: scripts that match the library."""
    from importlib.metadata import version

    return f"git clone --depth 1 --branch v{version('timm')} https://github.com/huggingface/{CLONE}"


def find_script(name: str) -> Path:
    """``name`` as given, or, for a bare name (``train.py``), the same file in ./pytorch-image-models."""
    script = Path(name)
    if script.is_file():
        return script
    if script.name == name and (Path(CLONE) / name).is_file():
        return Path(CLONE) / name
    raise UserError(f"{script} does not exist. timm's train.py and validate.py are not in its pip package; get the "
                    f"ones of the installed timm with `{clone_command()}`, then `metaformer timm {script.name} ...` "
                    f"finds them in ./{CLONE} (or pass the script's path)")


def run(args) -> int:
    from .. import zoo  # noqa: F401  (registers every metaformer_* model in timm's registry)

    script = find_script(args.script)
    argv, path = sys.argv[:], sys.path[:]
    sys.argv = [str(script), *args.script_args]
    sys.path.insert(0, str(script.parent.resolve()))  # as `python script.py` would
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:  # the script's own exit code
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:  # the caller's process as it was (main() may be called from Python)
        sys.argv[:], sys.path[:] = argv, path
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("timm", description="Run a timm script (train.py, validate.py: in the pytorch-image-models "
                                           "repository, not in timm's pip package) in a process where our models "
                                           "are registered in timm: --model metaformer_poolformer_s12, "
                                           "metaformer_caformer_s18, ... Everything after SCRIPT goes to the script. "
                                           "Distributed: torchrun --nproc_per_node=8 -m metaformer timm train.py ...")
    p.add_argument("script", help="path of timm's train.py, validate.py or another script; a bare name is also "
                   f"looked for in ./{CLONE}, where `git clone https://github.com/huggingface/{CLONE}` puts it")
    p.add_argument("script_args", nargs=argparse.REMAINDER, metavar="...", help="the script's own arguments")
    p.set_defaults(func=run)
