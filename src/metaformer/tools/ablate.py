"""The ablation lab: rerun the paper's Table 5, and ask it new questions, with one command.

Every row is PoolFormer-S12 (or the budget's scaled-down S12) with one change: a row of
:data:`metaformer.ABLATIONS`, or one the user defines on the command line (a token mixer by name,
a registered custom one, any MetaFormer argument or any ``metaformer train`` option). Each
(row, seed) cell is trained by the same :func:`metaformer.tasks.classification.train` as
``metaformer train``, with the same recipe and data; seed index ``k`` gives every row the same
seed, so differences between rows are paired (:mod:`.ablate_stats`).

The grid is a folder, ``grid.json`` (what it was started with) and ``rows/<row>/seed<k>/``: a
finished cell writes ``result.json`` and is skipped next time; an unfinished one resumes from its
``last.pth``. A run whose loss turns NaN is recorded as diverged and the grid goes on. Cells run in
turn, in parallel over ``--devices`` (one process per device), or as a SLURM job array through
submitit (:mod:`.ablate_submitit`); every launcher writes the same folder.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..atomic import atomic_write
from ..errors import ConfigError, MetaFormerError
from ..zoo import ABLATIONS, ablation_spec, build_from_config

# The quick budget's task: a built-in data set where tokens must be mixed (see metaformer.data.builtin).
QUICK_DATA = "builtin:odd-one-out"

# What a budget changes on top of `metaformer train`'s defaults (the paper's recipe, or the built-in data's
# recipe when --data is a built-in set).
BUDGETS = {
    # Each row's design at a quarter of S12's width and 5 blocks, 32 px, 5 epochs of the built-in odd-one-out
    # task: the whole default grid with its seeds fits QUICK_MINUTES on 2 CPU cores, and the baseline lands far
    # from both chance (25%) and 100%. base_lr 2e-2: at 4e-2 about one run in five stayed at chance for good.
    "quick": dict(data=QUICK_DATA, epochs=5, base_lr=2e-2, warmup_epochs=1, depths=[1, 1, 2, 1],
                  dims=[16, 32, 64, 128], img_size=32, workers=0),
    # The paper's recipe unchanged (PoolFormer-S12, 300 epochs, 224 px): needs --data.
    "paper": dict(),
}
# Seeds per row when --seeds is not given. The report says which differences they resolve and how many seeds a
# 2-point difference would need: with the quick budget's seed-to-seed spread (paired differences' pooled sd 6.8
# points, docs/ablation_quick_report.md) 5 seeds resolve about 5 points and 2 points would take about 47, ten
# times the quick grid's time. A paper-budget row costs hundreds of GPU-hours, and 3 seeds are the fewest whose
# t interval is useful.
DEFAULT_SEEDS = {"quick": 5, "paper": 3}

# Minutes the whole quick grid (every row, DEFAULT_SEEDS['quick'] seeds) takes on 2 quiet CPU cores
# (36.2 min in docs/ablation_quick_report.md, with --devices cpu,cpu); `ablate --help` and the README quote it.
QUICK_MINUTES = 36

REFERENCE = "baseline"
ROW_RESULT = "result.json"
GRID_FILE = "grid.json"

# Options a row may not set: they are the grid's (where it writes, which data, which seeds).
GRID_OWNED = ("output", "resume", "overwrite", "data", "seed", "device")


@dataclass(frozen=True)
class Row:
    """One row of a grid: a model change and/or ``metaformer train`` options on top of the grid's recipe."""

    name: str
    change: str  # what it changes, one line for the report
    variant: str = "poolformer_s12"
    model: dict = field(default_factory=dict)  # MetaFormer arguments (-> model_kwargs)
    train: dict = field(default_factory=dict)  # `metaformer train` options
    paper_top1: float | None = None
    paper_params: str | None = None
    paper_gmacs: float | None = None
    spec: str | None = None  # a user-defined row: its --row text (None: a row of the paper)


def paper_row(name: str) -> Row:
    variant, overrides = ablation_spec(name)
    _, what, params, macs, top1 = ABLATIONS[name]
    return Row(name, what, variant, overrides, {}, top1, params, macs)


def _metaformer_arguments() -> set[str]:
    from ..models.metaformer import MetaFormer

    return set(inspect.signature(MetaFormer).parameters) - {"num_classes", "img_size"}


def parse_row(text: str) -> Row:
    """A row from the command line: ``NAME=MIXER`` (a token mixer by its registered name) or
    ``NAME={KEY: VALUE, ...}`` (YAML): each KEY a MetaFormer argument (``token_mixers``, ``pool_size``,
    ``norm``, ...), ``model`` (a variant), or a ``metaformer train`` option (``lr``, ``epochs``, ...)."""
    from .. import yaml12
    from ..models.mixers import resolve_token_mixer
    from ..tasks.train_config import TrainConfig, coerce_option
    from ..zoo import list_models

    name, sep, spec = text.partition("=")
    name, spec = name.strip(), spec.strip()
    if not sep or not name or not spec:
        raise ConfigError(f"--row takes NAME=MIXER or NAME={{KEY: VALUE, ...}}, got {text!r}")
    if not all(c.isalnum() or c in "_-." for c in name) or name.startswith("."):
        raise ConfigError(f"--row {name!r}: a row name is letters, digits, '_', '-' and '.' (it names a folder)")
    if name in ABLATIONS:
        raise ConfigError(f"--row {name!r}: that is a row of the paper's table already; name yours otherwise")
    value = yaml12.load(spec, f"--row {name}")
    if isinstance(value, str):
        value = {"token_mixers": value}
    if not isinstance(value, dict) or not value:
        raise ConfigError(f"--row {name}: give a token mixer's name or a mapping {{KEY: VALUE, ...}}, got {spec!r}")
    train_types = {f.name: str(f.type) for f in dataclasses.fields(TrainConfig)}
    model_args = _metaformer_arguments()
    model, train, variant = {}, {}, "poolformer_s12"
    for key, v in value.items():
        key = str(key).replace("-", "_")
        if key in GRID_OWNED:
            raise ConfigError(f"--row {name}: {key} is the grid's, the same for every row (pass it to ablate)")
        if key == "model":
            if v not in list_models():
                raise ConfigError(f"--row {name}: model {v!r} is not a variant (`metaformer info` lists them)")
            variant = v
        elif key == "model_kwargs":
            if not isinstance(v, dict):
                raise ConfigError(f"--row {name}: model_kwargs must be a mapping")
            model.update(v)
        elif key in train_types:
            train[key] = coerce_option(key, v, train_types[key], f"--row {name}: {key}")
        elif key in model_args:
            model[key] = v
        else:
            raise ConfigError(f"--row {name}: {key!r} is neither a `metaformer train` option nor a MetaFormer "
                              "argument (see `metaformer train --help` and metaformer.MetaFormer)")
    mixers = model.get("token_mixers")
    for m in mixers if isinstance(mixers, list) else [mixers] if mixers is not None else []:
        if isinstance(m, str):
            try:
                resolve_token_mixer(m)  # an unknown mixer fails now, naming the registered ones
            except ConfigError as e:
                raise ConfigError(f"--row {name}: {e} (a mixer of your own: --plugin FILE.py)") from None
    change = ", ".join(f"{k} {json.dumps(v)}" for k, v in value.items())
    return Row(name, f"user row: {change}", variant, model, train, spec=text)


@dataclass
class Grid:
    """What a grid folder was started with; ``grid.json`` holds it, so that any process (a ``--devices``
    worker, a SLURM job) can train any cell of it."""

    budget: str
    flags: dict  # `metaformer train` options for every row
    config: str | None  # a YAML file of `metaformer train` options for every row
    rows: list[Row]
    seeds: int
    plugins: list[str] = field(default_factory=list)  # imported first: they register custom mixers
    reference: str = REFERENCE
    command: str = ""

    def row(self, name: str) -> Row:
        return next(r for r in self.rows if r.name == name)

    def cells(self) -> list[tuple[str, int]]:
        return [(r.name, k) for k in range(self.seeds) for r in self.rows]

    def to_json(self) -> dict:
        return {"command": self.command, "budget": self.budget, "rows": [r.name for r in self.rows],
                "user_rows": {r.name: r.spec for r in self.rows if r.spec}, "seeds": self.seeds,
                "flags": self.flags, "config": self.config, "plugins": self.plugins, "reference": self.reference}

    @classmethod
    def from_json(cls, d: dict) -> "Grid":
        import_plugins(d.get("plugins") or [])
        user = d.get("user_rows") or {}
        rows = [parse_row(user[n]) if n in user else paper_row(n) for n in d["rows"]]
        return cls(d["budget"], d["flags"], d.get("config"), rows, d["seeds"], d.get("plugins") or [],
                   d.get("reference", REFERENCE), d.get("command", ""))

    def save(self, output: Path) -> None:
        atomic_write(output / GRID_FILE, lambda f: f.write(json.dumps(self.to_json(), indent=2).encode()))


def load_grid(output: Path) -> Grid:
    return Grid.from_json(json.loads((Path(output) / GRID_FILE).read_text()))


def import_plugins(plugins: list[str]) -> None:
    """Import each plugin once: a ``.py`` file by path, otherwise a module by name (on ``sys.path``)."""
    for plugin in plugins:
        if plugin.endswith(".py"):
            path = Path(plugin).expanduser().resolve()
            name = f"metaformer_plugin_{abs(hash(str(path)))}"
            if name in sys.modules:
                continue
            if not path.is_file():
                raise ConfigError(f"--plugin {plugin}: no such file")
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            try:
                spec.loader.exec_module(module)
            except Exception as e:
                del sys.modules[name]
                raise ConfigError(f"--plugin {plugin} failed to import: {type(e).__name__}: {e}") from None
        else:
            try:
                importlib.import_module(plugin)
            except ImportError as e:
                raise ConfigError(f"--plugin {plugin}: {e} (give a .py file, or a module on PYTHONPATH)") from None


def row_dir(output: Path, row: str, seed_index: int) -> Path:
    return Path(output) / "rows" / row / f"seed{seed_index}"


def run_config(grid: Grid, row: Row, seed_index: int, output: Path):
    """The TrainConfig of one (row, seed): the grid's options, then the row's, its model change merged into
    the grid's ``model_kwargs``."""
    from ..tasks.train_config import resolve_config

    base = resolve_config(grid.flags, grid.config)
    flags = {**grid.flags, **row.train, "model": row.variant,
             "model_kwargs": {**base.model_kwargs, **(row.train.get("model_kwargs") or {}), **row.model}}
    cfg = resolve_config(flags, grid.config)
    return dataclasses.replace(cfg, seed=cfg.seed + seed_index, output=str(row_dir(output, row.name, seed_index)),
                               resume="auto")


def check_rows(grid: Grid, output: Path) -> None:
    """Every row's options resolve and its network builds (on the meta device: nothing is allocated), so a
    typo in the last row fails now, not hours into the grid."""
    from ..tasks.classification import check_extras
    from ..zoo import create_model

    for row in grid.rows:
        cfg = run_config(grid, row, 0, output)
        check_extras(cfg)
        overrides = dict(cfg.model_kwargs, img_size=cfg.img_size)
        for key, value in (("depths", cfg.depths), ("dims", cfg.dims), ("drop_path_rate", cfg.drop_path)):
            if value is not None:
                overrides[key] = value
        try:
            with torch.device("meta"):
                create_model(cfg.model, num_classes=2, **overrides)
        except TypeError as e:
            raise ConfigError(f"row {row.name}: bad model option: {e}") from None
        except ConfigError as e:
            raise ConfigError(f"row {row.name}: {e}") from None


def _complexity(run_dir: Path, img_size: int) -> dict:
    from .complexity import count_macs

    ckpt = torch.load(run_dir / "last.pth", map_location="cpu", weights_only=True, mmap=True)
    with torch.device("meta"):
        model = build_from_config(ckpt["model_config"], ckpt.get("variant"))
    return {"params": sum(p.numel() for p in model.parameters()),
            "gmacs": count_macs(model, img_size)["total"] / 1e9}


def read_result(output: Path, row: str, seed_index: int) -> dict | None:
    path = row_dir(output, row, seed_index) / ROW_RESULT
    return json.loads(path.read_text()) if path.is_file() else None


def _finished(run_dir: Path, epochs: int) -> dict | None:
    """The summary of a run whose training ended but whose cell was stopped before writing its result."""
    path = run_dir / "last.pth"
    if not path.is_file():
        return None
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    history = ckpt.get("history") or []
    if ckpt.get("epoch", 0) < epochs or ckpt.get("step_in_epoch") or not history:
        return None
    speeds = [h["images_per_s"] for h in history if h.get("images_per_s")]
    return {"final_top1": history[-1]["val_top1"], "best_top1": max(h["val_top1"] for h in history),
            "images_per_s": round(sum(speeds) / len(speeds), 1) if speeds else None}


def run_one(grid: Grid, row: str, seed_index: int, output: Path, device: str | None = None) -> dict:
    """Train one (row, seed) unless its result exists; returns the result. Under torchrun or a multi-task
    SLURM job every rank trains, and rank 0 writes the result."""
    from ..engine.stop import TrainingDiverged
    from ..tasks.classification import train

    output = Path(output)
    done = read_result(output, row, seed_index)
    if done is not None:
        return done
    cfg = run_config(grid, grid.row(row), seed_index, output)
    if device is not None:
        cfg = dataclasses.replace(cfg, device=device)
    result = {"row": row, "seed_index": seed_index, "seed": cfg.seed}
    t0 = time.time()
    try:
        summary = _finished(row_dir(output, row, seed_index), cfg.epochs) or train(cfg)
        result.update(status="ok", final_top1=summary["final_top1"], best_top1=summary["best_top1"],
                      images_per_s=summary["images_per_s"])
    except TrainingDiverged as e:
        result.update(status="diverged", message=str(e), final_top1=None, best_top1=None, images_per_s=None)
    result["wall_time_s"] = round(time.time() - t0, 1)
    if int(os.environ.get("RANK", "0")) != 0:
        return result
    out = row_dir(output, row, seed_index)
    if (out / "last.pth").is_file():
        result.update(_complexity(out, cfg.img_size))
    # a result exists only once the run is over
    atomic_write(out / ROW_RESULT, lambda f: f.write(json.dumps(result, indent=2).encode()))
    return result


@dataclass
class Failure:
    """A cell that ended without a result: its error's last line and where the whole log is."""

    cell: str  # "row/seedK"
    job_id: str  # the SLURM / submitit job, or "local"
    log: Path
    reason: str


ERROR_LOG = "error.txt"


def run_one_or_fail(grid: Grid, row: str, seed_index: int, output: Path, device: str | None = None) \
        -> tuple[dict | None, Failure | None]:
    """:func:`run_one`; an error (a bug in a mixer of one's own, a row that cannot train) is written with its
    traceback to the cell's ``error.txt`` and returned as a :class:`Failure`, so that the grid goes on. A user
    error (a missing ``--pretrained`` file, unreadable data: a :class:`MetaFormerError`) is raised instead: it
    would fail every cell the same way, and the grid stops with its one line."""
    log = row_dir(output, row, seed_index) / ERROR_LOG
    try:
        result = run_one(grid, row, seed_index, output, device)
        log.unlink(missing_ok=True)  # an earlier try's
        return result, None
    except Exception as e:  # Ctrl-C and Interrupted are BaseException / handled by the callers
        from ..engine.stop import Interrupted

        if isinstance(e, (Interrupted, MetaFormerError)):
            raise
        import traceback

        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(traceback.format_exc())
        reason = f"{type(e).__name__}: {e}".splitlines()[0]
        return None, Failure(f"{row}/seed{seed_index}", "local", log, reason)


def run_cell(output: str, row: str, seed_index: int) -> dict:
    """One cell in a fresh process (a submitit job): the grid from its folder, then :func:`run_one`. In a job
    of several tasks (one per GPU) it sets up torch.distributed's environment from SLURM's first."""
    output_path = Path(output)
    grid = load_grid(output_path)
    try:
        import submitit

        env = submitit.JobEnvironment()
        if env.num_tasks > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    except (ImportError, RuntimeError):  # not inside a submitit job
        pass
    return run_one(grid, row, seed_index, output_path)


# ----- running cells on this machine

def cpu_threads(devices: list[str]) -> int:
    """Threads for each CPU worker: the cores this process may use, shared by the CPU workers."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cpus // max(1, sum(d.startswith("cpu") for d in devices)))


def _device_worker(output: str, device: str, threads: int, tasks, results) -> None:
    """One ``--devices`` process: takes cells from ``tasks`` until it is empty or told to stop; reports each
    result or failure, or why it stopped, on ``results``."""
    from ..engine.stop import Interrupted

    if device.startswith("cpu"):
        torch.set_num_threads(threads)
    try:
        grid = load_grid(Path(output))
        while (cell := tasks.get()) is not None:
            results.put(("done", run_one_or_fail(grid, cell[0], cell[1], Path(output), device)))
    except (Interrupted, KeyboardInterrupt):  # Ctrl-C reached this process: its cell saved its progress
        results.put(("stopped", device))
        return
    except BaseException as e:  # the grid itself cannot be read: nothing this worker can do
        import traceback

        results.put(("error", (isinstance(e, MetaFormerError), str(e), traceback.format_exc())))
        return
    results.put(("idle", device))


def _run_on_devices(grid: Grid, output: Path, todo: list[tuple[str, int]], devices: list[str], progress,
                    failures: list) -> None:
    """One process per device, each taking the next cell as it frees. Ctrl-C (which the terminal sends to every
    process) lets each running cell save, hands out no new cell, and raises KeyboardInterrupt here once the
    workers are gone; a worker's error stops the others the same way and is raised here."""
    import multiprocessing as mp
    import queue
    import signal
    import threading

    ctx = mp.get_context("spawn")  # CUDA and fork do not mix
    tasks, results = ctx.Queue(), ctx.Queue()
    for cell in todo:
        tasks.put(cell)
    for _ in devices:
        tasks.put(None)
    threads = cpu_threads(devices)
    workers = [ctx.Process(target=_device_worker, args=(str(output), d, threads, tasks, results), daemon=True)
               for d in devices]
    for w in workers:
        w.start()

    def stop(signum: int | None) -> None:
        while True:  # no new cell for anyone ...
            try:
                tasks.get_nowait()
            except queue.Empty:
                break
        for w in workers:  # ... and an end for every worker
            tasks.put(None)
            if signum is not None and w.is_alive():
                os.kill(w.pid, signum)  # asks a running cell to save and stop (a second signal would abort)

    def on_term(signum, frame):  # a scheduler's SIGTERM to this process alone: as Ctrl-C
        raise KeyboardInterrupt

    failure, interrupted, finished, stopping = None, False, 0, False
    main = threading.current_thread() is threading.main_thread()
    old_term = signal.signal(signal.SIGTERM, on_term) if main else None
    try:
        while any(w.is_alive() for w in workers) or not results.empty():
            try:
                kind, payload = results.get(timeout=0.5)
            except queue.Empty:
                continue
            if kind == "done":
                finished += 1
                result, failure_ = payload
                progress(_cell_line(result, failure_, finished, len(todo)))
                if failure_ is not None:
                    failures.append(failure_)
            elif kind == "stopped":  # a signal reached the worker (and maybe not this process)
                interrupted = True
                if not stopping:
                    stopping = True
                    stop(None)
            elif kind == "error" and failure is None:
                failure = payload
                if not stopping:
                    stopping = True
                    stop(signal.SIGTERM)
    except KeyboardInterrupt:
        # A terminal's Ctrl-C reached every worker too: each saves its cell and stops. A signal to this process
        # alone lets the running cells finish. Either way no new cell starts.
        interrupted = True
        if not stopping:
            stop(None)
        while any(w.is_alive() for w in workers):  # reading on, so that no worker waits to flush its results
            try:
                results.get(timeout=0.2)
            except queue.Empty:
                pass
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    for w in workers:
        w.join()
    if failure is not None:
        user_error, message, trace = failure
        if user_error:
            raise ConfigError(message)
        raise RuntimeError(f"a --devices worker failed:\n{trace}")
    if interrupted:
        raise KeyboardInterrupt


def run_local(grid: Grid, output: Path, devices: list[str] | None = None, progress=print) \
        -> tuple[list[dict], list[Failure]]:
    """Every unfinished cell, in turn, or over ``devices`` (one process per entry: ``cuda:0,cuda:1``, or
    ``cpu,cpu`` for two CPU processes sharing the cores), each taking the next cell as it frees. Returns the
    grid's results and the cells that failed (the others went on)."""
    todo = [(r, k) for r, k in grid.cells() if read_result(output, r, k) is None]
    failures: list[Failure] = []
    if devices and len(devices) > 1 and len(todo) > 1:
        _run_on_devices(grid, output, todo, devices, progress, failures)
    else:
        device = devices[0] if devices else None
        for i, (row, k) in enumerate(todo):
            result, failure = run_one_or_fail(grid, row, k, output, device)
            progress(_cell_line(result, failure, i + 1, len(todo)))
            if failure is not None:
                failures.append(failure)
    return collect(grid, output), failures


def _cell_line(result: dict | None, failure: Failure | None, i: int, n: int) -> str:
    if failure is not None:
        return f"[{i}/{n}] {failure.cell}: FAILED ({failure.reason}); log {failure.log}"
    top1 = f"top-1 {result['final_top1']:.2f}%" if result.get("final_top1") is not None else result["status"]
    return f"[{i}/{n}] {result['row']} seed {result['seed_index']}: {top1} ({result['wall_time_s']:.0f}s)"


def collect(grid: Grid, output: Path) -> list[dict]:
    """The results the grid's folder holds (finished cells only)."""
    return [r for r in (read_result(output, row, k) for row, k in grid.cells()) if r is not None]


TIMING = "timing.json"


def add_wall_time(output: Path, seconds: float, cells: int) -> dict:
    """Add one invocation's wall time (when it trained ``cells`` cells) to the grid's total."""
    path = Path(output) / TIMING
    t = json.loads(path.read_text()) if path.is_file() else {"wall_s": 0.0, "invocations": 0, "cells": 0}
    if cells:
        t = {"wall_s": t["wall_s"] + seconds, "invocations": t["invocations"] + 1, "cells": t["cells"] + cells}
        atomic_write(path, lambda f: f.write(json.dumps(t, indent=2).encode()))
    return t


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in ["metaformer"] + sys.argv[1:])
