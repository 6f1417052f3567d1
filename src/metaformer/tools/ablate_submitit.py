"""Ablation grids beyond one machine: each unfinished (row, seed) cell as a job of one SLURM job array,
through submitit.

The jobs train in the grid's own folder (:func:`.ablate.run_cell`), so the launcher only submits, waits and
reads back what the cells wrote. Its logs are in ``GRID/jobs/``; ``GRID/jobs/submitted.json`` remembers which
job holds which cell, so that a re-run waits on a job SLURM still lists as pending or running instead of
submitting its cell twice. ``cluster='local'`` is submitit's local executor: the same pickled jobs run as
subprocesses of this one (how the tests run it), at most ``local_parallelism`` at a time.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ..atomic import atomic_write
from ..errors import ConfigError, require
from .ablate import Failure, Grid, read_result, run_cell

JOBS = "jobs"
SUBMITTED = "submitted.json"
LIVE_STATES = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED")
CLUSTERS = ("auto", "slurm", "local")


def default_resources(budget: str) -> dict:
    """A job's resources unless --submitit or its YAML say otherwise: the quick budget's cells are small CPU
    runs; a paper-budget cell is one S12 run of 300 epochs on one GPU (with gradient accumulation)."""
    if budget == "paper":
        return {"timeout_min": 72 * 60, "gpus_per_node": 1, "tasks_per_node": 1, "cpus_per_task": 10,
                "mem_gb": 64}
    return {"timeout_min": 60, "gpus_per_node": 0, "tasks_per_node": 1, "cpus_per_task": 2, "mem_gb": 8}


def import_submitit():
    """submitit, imported without letting it configure logging: at import it calls ``logging.config.dictConfig``,
    which closes every handler the process already has (absl's, loaded with TensorBoard, closes ``sys.stderr``
    with it). ``SUBMITIT_LOG_LEVEL=NOCONFIG`` (unless the user chose a level) leaves logging as it is; submitit's
    warnings still reach stderr through logging's last-resort handler."""
    os.environ.setdefault("SUBMITIT_LOG_LEVEL", "NOCONFIG")
    return require("submitit", "cluster", "--launcher submitit")


def make_executor(folder: Path, cluster: str, resources: dict):
    submitit = import_submitit()
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster=None if cluster == "auto" else cluster)
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f"--cluster {cluster}: {e}") from None
    params = dict(resources)
    params.setdefault("name", "metaformer-ablate")
    try:
        executor.update_parameters(**params)
    except (NameError, AssertionError, ValueError, TypeError) as e:
        first = str(e).splitlines()[0]
        raise ConfigError(f"--submitit: {first} (the keys are submitit's AutoExecutor parameters: timeout_min, "
                          "gpus_per_node, cpus_per_task, mem_gb, tasks_per_node, slurm_partition, slurm_account, "
                          "slurm_array_parallelism, ...)") from None
    return executor


def _cell(row: str, k: int) -> str:
    return f"{row}/seed{k}"


def _load_submitted(folder: Path) -> dict:
    path = folder / SUBMITTED
    return json.loads(path.read_text()) if path.is_file() else {}


def _live_jobs(submitted: dict, folder: Path, todo: list[tuple[str, int]]) -> dict:
    """The SLURM jobs of an earlier run that still hold one of ``todo``'s cells (pending or running)."""
    live = {}
    wanted = {_cell(r, k) for r, k in todo}
    submitit = import_submitit()

    for cell, info in submitted.items():
        if cell in wanted and info.get("cluster") == "slurm":
            job = submitit.SlurmJob(folder=folder, job_id=info["job_id"])
            if job.state in LIVE_STATES:
                live[cell] = job
    return live


def run_submitit(grid: Grid, output: Path, cluster: str = "auto", resources: dict | None = None,
                 local_parallelism: int = 1, progress=print, poll_s: float = 2.0) -> tuple[list[dict], list[Failure]]:
    """Submit every unfinished cell (one job array), wait for them, and return ``(results, failures)``: the
    grid's finished cells, and the jobs that ended without a result, with their log paths."""
    from .ablate import collect

    folder = output / JOBS
    folder.mkdir(parents=True, exist_ok=True)
    executor = make_executor(folder, cluster, {**default_resources(grid.budget), **(resources or {})})
    todo = [(r, k) for r, k in grid.cells() if read_result(output, r, k) is None]
    submitted = _load_submitted(folder)
    jobs = _live_jobs(submitted, folder, todo) if executor.cluster == "slurm" else {}
    if jobs:
        progress(f"waiting on {len(jobs)} cell(s) still queued or running from an earlier submission: "
                 + ", ".join(sorted(jobs)))
    new = [(r, k) for r, k in todo if _cell(r, k) not in jobs]
    # submitit's local executor starts every job it is given at once: hand it a slice at a time
    step = len(new) if executor.cluster != "local" else max(1, local_parallelism)
    failures: list[Failure] = []
    done = 0
    for start in range(0, len(new), step):
        part = new[start:start + step]
        array = executor.map_array(run_cell, [str(output)] * len(part), [r for r, _ in part], [k for _, k in part])
        part_jobs = {_cell(r, k): job for (r, k), job in zip(part, array)}
        for cell, job in part_jobs.items():
            submitted[cell] = {"job_id": job.job_id, "cluster": executor.cluster}
        atomic_write(folder / SUBMITTED, lambda f: f.write(json.dumps(submitted, indent=2).encode()))
        progress(f"submitted {len(part)} cell(s) to {executor.cluster} as job array "
                 f"{array[0].job_id.split('_')[0]} (logs: {folder})")
        if executor.cluster == "local":
            done = _wait(part_jobs, output, failures, progress, poll_s, done, len(todo))
        else:
            jobs.update(part_jobs)
    _wait(jobs, output, failures, progress, poll_s, done, len(todo))
    return collect(grid, output), failures


def _wait(jobs: dict, output: Path, failures: list[Failure], progress, poll_s: float, done: int, total: int) -> int:
    """Wait for ``jobs`` ({cell: job}); a job that ended without its cell's result is a :class:`Failure`."""
    pending = dict(jobs)
    while pending:
        for cell, job in list(pending.items()):
            if not job.done():
                continue
            del pending[cell]
            done += 1
            row, seed = cell.rsplit("/seed", 1)
            result = read_result(output, row, int(seed))
            if result is not None:
                top1 = result.get("final_top1")
                progress(f"[{done}/{total}] {row} seed {seed}: "
                         + (f"top-1 {top1:.2f}%" if top1 is not None else result["status"]))
                continue
            error = job.exception()
            lines = [line for line in str(error or "no result written").splitlines() if line.strip()
                     and not line.startswith(("---", "You can check", "or at paths", "  - "))]
            reason = lines[-1].strip() if lines else "no result written"
            failures.append(Failure(cell, job.job_id, job.paths.stderr, reason))
            progress(f"[{done}/{total}] {row} seed {seed}: FAILED ({reason}); log {job.paths.stderr}")
        if pending:
            time.sleep(poll_s)
    return done
