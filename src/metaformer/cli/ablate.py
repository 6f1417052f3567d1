"""``metaformer ablate``: rerun the paper's Table 5, or ask it new questions (see :mod:`metaformer.tools.ablate`)."""
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


def _parse_resources(items: list[str], path: str | None) -> dict:
    """submitit parameters: a YAML mapping file, then ``KEY=VALUE`` flags (which win)."""
    out = {}
    if path:
        loaded = yaml12.load_file(path)
        if not isinstance(loaded, dict):
            raise UserError(f"--submitit-config {path} must be a YAML mapping of submitit parameters "
                            "(timeout_min: 600, slurm_partition: gpu, ...)")
        out.update({str(k): v for k, v in loaded.items()})
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--submitit takes KEY=VALUE (a submitit parameter), got {item!r}")
        out[key.strip()] = yaml12.load(value, f"--submitit {key.strip()}")
    return out


def check_same_grid(output: Path, grid: dict) -> None:
    """A grid folder holds one experiment: the budget, data, flags and config it was started with, and each
    row's definition. Rows and seeds may be added; anything else would mix runs of two recipes in one report."""
    from ..tools.ablate import GRID_FILE

    path = output / GRID_FILE
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
        ("train options", json.dumps(before.get("flags")), json.dumps(grid["flags"])),
        ("reference row", before.get("reference", "baseline"), grid["reference"])) if a != b]
    then, now = before.get("user_rows") or {}, grid["user_rows"]
    diffs += [f"row {name}: {then[name]!r} then, {now[name]!r} now" for name in sorted(set(then) & set(now))
              if then[name] != now[name]]
    if diffs:
        raise UserError(f"{output} already holds a grid run with other settings ({'; '.join(diffs)}). Its finished "
                        "rows would be reported as results of this one: use another --output")


def merged_grid(output: Path, grid) -> None:
    """Rows and seeds of an earlier run of the same grid stay in it (the report covers them all)."""
    from ..tools.ablate import GRID_FILE, import_plugins, paper_row, parse_row

    path = output / GRID_FILE
    if not path.is_file():
        return
    before = json.loads(path.read_text())
    earlier = [p for p in before.get("plugins") or [] if p not in grid.plugins]
    import_plugins(earlier)  # the earlier rows' mixers
    grid.plugins += earlier
    names = [r.name for r in grid.rows]
    user = before.get("user_rows") or {}
    for name in before.get("rows", []):
        if name not in names:
            grid.rows.append(parse_row(user[name]) if name in user else paper_row(name))
    grid.seeds = max(grid.seeds, before.get("seeds", 1))


def build_grid(args):
    from ..tools.ablate import BUDGETS, DEFAULT_SEEDS, REFERENCE, Grid, command_line, import_plugins, paper_row, \
        parse_row
    from ..zoo import ABLATIONS

    plugins = [str(Path(p).expanduser().resolve()) if p.endswith(".py") else p for p in args.plugin or []]
    import_plugins(plugins)
    user_rows = [parse_row(text) for text in args.row or []]
    if len({r.name for r in user_rows}) < len(user_rows):
        raise UserError("--row: two rows have the same name")
    if args.rows:
        names = [r.strip() for r in args.rows.split(",") if r.strip()]
    else:  # with rows of one's own, the default is to compare them with the reference
        names = [] if user_rows else list(ABLATIONS)
    unknown = [r for r in names if r not in ABLATIONS]
    if unknown:
        raise UserError(f"unknown row(s) {', '.join(unknown)}; rows: {', '.join(ABLATIONS)} (or define one with --row)")
    reference = args.reference or REFERENCE
    if reference not in ABLATIONS and reference not in {r.name for r in user_rows}:
        raise UserError(f"--reference {reference}: not a row of this grid")
    if reference in ABLATIONS and reference not in names:
        names.insert(0, reference)  # the differences are from it
    rows = [paper_row(n) for n in dict.fromkeys(names)] + user_rows
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
    seeds = args.seeds or DEFAULT_SEEDS[args.budget]
    return Grid(args.budget, flags, args.config, rows, seeds, plugins, reference, command_line())


def run(args) -> int:
    import torch

    from ..atomic import check_writable
    from ..engine.checkpoint import RunFolder
    from ..engine.stop import Interrupted
    from ..errors import need
    from ..tools.ablate import add_wall_time, check_rows, collect, command_line, read_result, run_local
    from ..tools.ablate_report import write_report

    grid = build_grid(args)
    submitit_run = args.launcher == "submitit"
    if submitit_run:
        if args.devices:
            raise UserError("--devices is for --launcher local; with submitit each job gets its resources from "
                            "--submitit (gpus_per_node=...)")
        need("submitit", "cluster", "--launcher submitit")
        resources = _parse_resources(args.submitit, args.submitit_config)
    elif args.submitit or args.submitit_config or args.cluster != "auto":
        raise UserError("--submitit, --submitit-config and --cluster go with --launcher submitit")
    if args.devices:
        devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    elif torch.cuda.device_count() > 1 and not submitit_run:
        devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    else:
        devices = None
    output = Path(args.output)
    check_writable(output, f"--output {output}", folder=True)  # before the first row trains
    check_same_grid(output, grid.to_json())
    merged_grid(output, grid)
    check_rows(grid, output)  # a value out of range or a missing package fails now, not in a row
    need("scipy", "train", "the statistics of the ablation report")
    need("matplotlib", "train", "the ablation chart")
    folder = RunFolder(output)  # the grid's folder counts once a row has started training
    folder.create()
    folder.opened(continuing=False)
    grid.save(output)
    t0 = time.time()
    failures = []
    todo = len([c for c in grid.cells() if read_result(output, *c) is None])
    try:
        if submitit_run:
            from ..tools.ablate_submitit import run_submitit

            results, failures = run_submitit(grid, output, args.cluster, resources, args.local_parallelism,
                                             progress=_progress(args))
        else:
            results, failures = run_local(grid, output, devices, progress=_progress(args))
    except BaseException as e:
        folder.started = (output / "rows").exists()  # a row that never trained removed its own folder
        if not folder.started:
            folder.undo()
        if not isinstance(e, (KeyboardInterrupt, Interrupted)):
            raise
        if not folder.started:
            print("metaformer ablate: interrupted before the first row started; nothing was kept", file=sys.stderr)
            return 130
        print(f"metaformer ablate: interrupted; finished rows are kept and the running one saved its progress"
              + ("; submitted SLURM jobs keep running" if submitit_run else "")
              + f". Continue with the same command:\n  {command_line()}", file=sys.stderr)
        return 130
    wall = time.time() - t0
    done = {(r["row"], r["seed_index"]) for r in collect(grid, output)}
    missing = [f"{r}/seed{k}" for r, k in grid.cells() if (r, k) not in done]
    timing = add_wall_time(output, wall, todo - len(missing))
    md, table, summary = write_report(grid, results, output, missing, timing)
    if args.json:
        print_json({"rows": table, "summary": summary, "failed": [
            {"cell": f.cell, "job_id": f.job_id, "log": str(f.log), "reason": f.reason} for f in failures]})
    else:
        print(md.read_text())
        print(f"grid of {len(grid.rows)} row(s) x {grid.seeds} seed(s): {len(done)} of {len(grid.cells())} cells "
              f"finished, {wall:.0f}s -> {md}, {output / 'report.csv'}, {output / 'report.png'}")
    if failures or missing:
        for f in failures:
            job = "" if f.job_id == "local" else f" (job {f.job_id})"
            print(f"metaformer ablate: cell {f.cell} failed{job}: {f.reason}\n  log: {f.log}", file=sys.stderr)
        again = "resubmit" if submitit_run else "retry"
        print(f"metaformer ablate: {len(missing)} cell(s) unfinished; the report covers the finished ones. Run the "
              f"same command again to {again} them:\n  {command_line()}", file=sys.stderr)
        return 1
    return 0


def _progress(args):
    def show(line: str) -> None:
        print(line, file=sys.stderr if args.json else sys.stdout, flush=True)

    return show


def add_parser(sub) -> None:
    from ..tools.ablate import BUDGETS, DEFAULT_SEEDS, QUICK_DATA, QUICK_MINUTES
    from ..tools.ablate_submitit import CLUSTERS
    from ..zoo import ABLATIONS

    p = sub.add_parser("ablate", description="Train each ablation row over several seeds with the same recipe and "
                                   "data through the same code as `metaformer train`, then write a table (markdown, "
                                   "CSV) with 95% confidence intervals, each row's paired difference from the "
                                   "reference row (resolved or not), the rank correlation with the paper and a "
                                   "chart. Re-running with the same --output skips finished cells and resumes "
                                   "the unfinished ones.")
    p.add_argument("--rows", help=f"comma-separated subset of: {', '.join(ABLATIONS)} (default: all; with --row: "
                                  "only the reference). The reference row is always included")
    p.add_argument("--row", action="append", metavar="NAME=SPEC",
                   help="a row of your own (repeatable): NAME=MIXER (a token mixer by name, e.g. dwconv, or one "
                        "--plugin registers), or NAME={KEY: VALUE, ...} with MetaFormer arguments (token_mixers, "
                        "pool_size, norm, act, ...), model (a variant) or any `metaformer train` option (lr, "
                        "epochs, ...), e.g. --row 'pool5_ln={pool_size: 5, norm: ln}'")
    p.add_argument("--plugin", action="append", metavar="FILE.py|MODULE",
                   help="import this first, in every process of the grid (e.g. a file that registers a token mixer "
                        "with metaformer.register_token_mixer); repeatable")
    p.add_argument("--reference", help="the row the differences are from (default: baseline)")
    p.add_argument("--seeds", type=whole(1, 100), default=None,
                   help="runs per row, seed indices 0..N-1, the same for every row (default: "
                        + ", ".join(f"{n} for --budget {b}" for b, n in DEFAULT_SEEDS.items()) + ")")
    p.add_argument("--budget", choices=list(BUDGETS), default="quick",
                   help=f"quick: scaled-down S12 on the built-in {QUICK_DATA.split(':')[1]} task, about "
                        f"{QUICK_MINUTES} minutes for the whole grid with its seeds on 2 CPU cores (--devices cpu,cpu); "
                        "paper: the paper's ImageNet recipe (needs --data)")
    p.add_argument("--data", help=f"any `metaformer train --data` source (default: {QUICK_DATA} for --budget quick)")
    p.add_argument("--config", help="YAML of `metaformer train` options applied to every row")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="a `metaformer train` option for every row, "
                   "e.g. --set epochs=10 (repeatable)")
    p.add_argument("--devices", help="comma-separated devices to run cells on in parallel, one process each, e.g. "
                   "cuda:0,cuda:1, or cpu,cpu for two CPU processes sharing the cores (default: every GPU when there "
                   "are several)")
    p.add_argument("--launcher", choices=["local", "submitit"], default="local",
                   help="local: on this machine (in turn, or over --devices); submitit: every unfinished cell as a "
                        "job of one SLURM job array (needs `pip install 'metaformer[cluster]'`), results in the same "
                        "grid folder")
    p.add_argument("--cluster", choices=CLUSTERS, default="auto",
                   help="with --launcher submitit: slurm, local (submitit's local executor: subprocesses of this "
                        "command) or auto (SLURM where sbatch is found)")
    p.add_argument("--submitit", action="append", metavar="KEY=VALUE",
                   help="a job resource (submitit's AutoExecutor parameter; repeatable), e.g. timeout_min=4320, "
                        "gpus_per_node=1, cpus_per_task=10, mem_gb=64, slurm_partition=gpu, "
                        "slurm_array_parallelism=32")
    p.add_argument("--submitit-config", metavar="FILE.yaml",
                   help="a YAML mapping of the same job resources (--submitit flags win)")
    p.add_argument("--local-parallelism", type=whole(1, 1024), default=1,
                   help="with --cluster local: jobs running at once (default 1)")
    add_output(p, "runs/ablate", "grid directory (re-use it to resume)")
    add_json(p, "print the result table and summary as JSON instead of the markdown report")
    p.set_defaults(func=run)
