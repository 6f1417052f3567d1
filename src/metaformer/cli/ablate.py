"""``metaformer ablate``: rerun the paper's Table 5 (see :mod:`metaformer.tools.ablate`)."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from .. import yaml12
from ..ranges import whole
from . import UserError
from .common import add_json, add_output, print_json


def _parse_set(items: list[str]) -> dict:
    """``KEY=VALUE`` pairs of `metaformer train` options, each VALUE read as YAML and checked against the
    option's type (``--set lr=1e-3`` is a number)."""
    import dataclasses

    from ..tasks.train_config import TrainConfig, coerce_option

    types = {f.name: str(f.type) for f in dataclasses.fields(TrainConfig)}
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--set takes KEY=VALUE (a `metaformer train` option), got {item!r}")
        key = key.strip().replace("-", "_")
        if key not in types:
            raise UserError(f"--set: unknown train option {key!r} (see `metaformer train --help`)")
        out[key] = coerce_option(key, yaml12.load(value, f"--set {key}"), types[key], f"--set {key}")
    return out


def check_same_grid(output: Path, grid: dict) -> None:
    """A grid folder holds one experiment: the budget, data, flags and config it was started with.
    Rows and seeds may be added; anything else would mix runs of two recipes in one report."""
    path = output / "grid.json"
    if not path.is_file():
        if output.is_dir() and (output / "rows").is_dir():
            raise UserError(f"{output} holds ablation rows but no grid.json, so what they were trained with is "
                            "unknown: use another --output")
        return
    try:
        before = json.loads(path.read_text())
    except (OSError, ValueError):
        raise UserError(f"{path} is unreadable: use another --output, or delete that folder to start over") from None

    def data(g):
        return g.get("flags", {}).get("data") or "the built-in digits"

    diffs = [f"{what}: {a} then, {b} now" for what, a, b in (
        ("budget", before.get("budget"), grid["budget"]), ("data", data(before), data(grid)),
        ("config", before.get("config"), grid["config"]),
        ("train options", json.dumps(before.get("flags")), json.dumps(grid["flags"]))) if a != b]
    if diffs:
        raise UserError(f"{output} already holds a grid run with other settings ({'; '.join(diffs)}). Its finished "
                        "rows would be reported as results of this one: use another --output")


def run(args) -> int:
    import torch

    from ..atomic import check_writable
    from ..engine.checkpoint import RunFolder
    from ..errors import need
    from ..tasks.classification import check_extras
    from ..tools.ablate import BUDGETS, command_line, run_config, run_grid, summarise, write_report
    from ..zoo import ABLATIONS
    from ..engine.stop import Interrupted

    rows = [r.strip() for r in args.rows.split(",") if r.strip()] if args.rows else list(ABLATIONS)
    unknown = [r for r in rows if r not in ABLATIONS]
    if unknown:
        raise UserError(f"unknown row(s) {', '.join(unknown)}; rows: {', '.join(ABLATIONS)}")
    if args.seeds < 1:
        raise UserError("--seeds must be at least 1")
    flags = dict(BUDGETS[args.budget])
    if args.data:
        from ..data import is_builtin, open_source

        if not is_builtin(args.data):
            open_source(args.data, None, None)  # a missing or mislaid source fails now, not after the first rows
        flags["data"] = args.data
    elif args.budget == "paper":
        raise UserError("--budget paper is the paper's ImageNet recipe: pass --data with an ImageNet-layout root")
    extra = _parse_set(args.set)
    if any(k in extra for k in ("model", "output", "resume")):
        raise UserError("--set cannot change model, output or resume: the grid sets them per row")
    flags.update(extra)

    if args.devices:
        devices = [d.strip() for d in args.devices.split(",")]
    elif torch.cuda.device_count() > 1:
        devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    else:
        devices = None
    output = Path(args.output)
    check_writable(output, f"--output {output}", folder=True)  # before the first row trains
    first = run_config(flags, rows[0], 0, output, args.config)  # a value out of range fails now, not in a row
    check_extras(first)  # and a package the rows or the report need
    need("scipy", "train", "the rank correlation of the ablation report")
    grid = {"command": command_line(), "budget": args.budget, "rows": rows, "seeds": args.seeds, "flags": flags,
            "config": args.config}
    check_same_grid(output, grid)
    folder = RunFolder(output)  # the grid's folder counts once a row has started training
    folder.create()
    folder.opened(continuing=False)
    (output / "grid.json").write_text(json.dumps(grid, indent=2))
    t0 = time.time()
    try:
        results = run_grid(rows, args.seeds, flags, output, args.config, devices)
    except BaseException as e:
        folder.started = (output / "rows").exists()  # a row that never trained removed its own folder
        if not folder.started:
            folder.undo()
        if not isinstance(e, (KeyboardInterrupt, Interrupted)):
            raise
        if not folder.started:
            print("metaformer ablate: interrupted before the first row started; nothing was kept", file=sys.stderr)
            return 130
        print(f"metaformer ablate: interrupted; finished rows are kept and the running one saved its progress. "
              f"Continue with the same command:\n  {command_line()}", file=sys.stderr)
        return 130
    table = summarise(results)
    md = write_report(table, output, command_line(), flags, args.budget, args.config)
    if args.json:
        print_json(table)
        return 0
    print(md.read_text())
    print(f"grid of {len(rows)} row(s) x {args.seeds} seed(s) done in {time.time() - t0:.0f}s "
          f"-> {md}, {output / 'report.csv'}, {output / 'report.png'}")
    return 0


def add_parser(sub) -> None:
    from ..tools.ablate import BUDGETS, QUICK_MINUTES
    from ..zoo import ABLATIONS

    p = sub.add_parser("ablate", description="Train each ablation row with the same recipe, seed and data through the same "
                                   "code as `metaformer train`, then write a table (markdown, CSV), a bar chart and "
                                   "the rank correlation with the paper. Re-running with the same --output skips "
                                   "finished rows and resumes the unfinished one.")
    p.add_argument("--rows", help=f"comma-separated subset of: {', '.join(ABLATIONS)} (default: all)")
    p.add_argument("--seeds", type=whole(1, 100), default=1, help="runs per row (report mean ± std)")
    p.add_argument("--budget", choices=list(BUDGETS), default="quick",
                   help=f"quick: scaled-down S12 on the built-in digits, about {QUICK_MINUTES} minutes for the whole "
                        "grid on 2 CPU cores; "
                        "paper: the paper's ImageNet recipe (needs --data)")
    p.add_argument("--data", help="any `metaformer train --data` source (default: the built-in digits)")
    p.add_argument("--config", help="YAML of `metaformer train` options applied to every row")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="a `metaformer train` option for every row, "
                   "e.g. --set epochs=10 (repeatable)")
    p.add_argument("--devices", help="comma-separated devices to run rows on in parallel, e.g. cuda:0,cuda:1 "
                   "(default: every GPU when there are several)")
    add_output(p, "runs/ablate", "grid directory (re-use it to resume)")
    add_json(p, "print the result table as JSON instead of the markdown report")
    p.set_defaults(func=run)
