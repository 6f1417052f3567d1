"""``metaformer timm SCRIPT ...``: run one of timm's scripts (train.py, validate.py, inference.py) with our
models registered, so ``--model metaformer_poolformer_s12`` (or any ``metaformer_*`` name) builds ours."""
from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

from . import UserError


def run(args) -> int:
    import metaformer  # noqa: F401  (registers every metaformer_* model in timm's registry)

    script = Path(args.script)
    if not script.is_file():
        raise UserError(f"{script} does not exist. timm's train.py and validate.py live in the pytorch-image-models "
                        "repository, not in the pip package: git clone https://github.com/huggingface/"
                        "pytorch-image-models and pass the path of its train.py")
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
    p = sub.add_parser("timm", help="run timm's train.py / validate.py with metaformer's models registered",
                       description="Run a timm script (from the pytorch-image-models repository) in a process where "
                                   "`import metaformer` has registered our models: --model metaformer_poolformer_s12, "
                                   "metaformer_caformer_s18, ... Everything after SCRIPT goes to the script. "
                                   "Distributed: torchrun --nproc_per_node=8 -m metaformer timm train.py ...")
    p.add_argument("script", help="path of timm's train.py, validate.py or another script")
    p.add_argument("script_args", nargs=argparse.REMAINDER, metavar="...", help="the script's own arguments")
    p.set_defaults(func=run)
