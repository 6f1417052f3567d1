"""The ablation lab: rerun the paper's Table 5 with one command.

Every row is PoolFormer-S12 (or the budget's scaled-down S12) with one change from
:data:`metaformer.ABLATIONS`, trained by the same :func:`metaformer.tasks.classification.train` as
``metaformer train``: same recipe, data and seeds. The grid is resumable: each finished run
writes ``rows/<row>/seed<k>/result.json`` and is skipped next time; an unfinished run
resumes from its ``last.pth``. A run whose loss turns NaN is recorded as diverged and the
grid goes on. With several GPUs, rows run in parallel, one process per device.
"""
from __future__ import annotations

import dataclasses
import json
import math
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from ..atomic import atomic_write
from ..errors import require
from ..zoo import ABLATIONS, ablation_spec, build_from_config

# What a budget changes on top of `metaformer train`'s defaults (which are the paper's recipe,
# or the scaled-down digits demo when no data is given).
BUDGETS = {
    # Each row's design at about half width and 5 blocks, 32 px, on the built-in digits: the whole
    # 24-row grid takes QUICK_MINUTES on 2 quiet CPU cores. 20 epochs and a higher lr than the demo,
    # because with LayerScale starting at 1e-5 fewer steps leave every block near identity and
    # all rows score the same.
    "quick": dict(epochs=20, base_lr=4e-2, warmup_epochs=2, depths=[1, 1, 2, 1], dims=[32, 64, 128, 256],
                  img_size=32, workers=0),
    # The paper's recipe unchanged (PoolFormer-S12, 300 epochs, 224 px): needs --data.
    "paper": dict(),
}

# Minutes the whole quick grid took on 2 quiet CPU cores (docs/ablation_quick_report.md's run: 24 rows x 20 epochs at
# ~900 images/s); `ablate --help` and the README quote this one figure.
QUICK_MINUTES = 13

ROW_RESULT = "result.json"


def row_dir(output: Path, row: str, seed_index: int) -> Path:
    return output / "rows" / row / f"seed{seed_index}"


def run_config(base_flags: dict, row: str, seed_index: int, output: Path, config_file: str | None):
    """The TrainConfig of one (row, seed): the grid's flags plus the row's model change."""
    from ..tasks.train_config import resolve_config

    variant, overrides = ablation_spec(row)
    flags = dict(base_flags)
    flags["model"] = variant
    flags["model_kwargs"] = {**(flags.get("model_kwargs") or {}), **overrides}
    cfg = resolve_config(flags, config_file)
    return dataclasses.replace(cfg, seed=cfg.seed + seed_index, output=str(row_dir(output, row, seed_index)),
                               resume="auto")


def _complexity(run_dir: Path, img_size: int) -> dict:
    from .complexity import count_macs

    ckpt = torch.load(run_dir / "last.pth", map_location="cpu", weights_only=True, mmap=True)
    with torch.device("meta"):
        model = build_from_config(ckpt["model_config"], ckpt.get("variant"))
    return {"params": sum(p.numel() for p in model.parameters()),
            "gmacs": count_macs(model, img_size)["total"] / 1e9}


def run_one(base_flags: dict, row: str, seed_index: int, output: Path, config_file: str | None,
            device: str | None = None) -> dict:
    """Train one (row, seed) unless its result exists; returns the result."""
    from ..engine.stop import TrainingDiverged
    from ..tasks.classification import train

    out = row_dir(output, row, seed_index)
    done = out / ROW_RESULT
    if done.is_file():
        return json.loads(done.read_text())
    cfg = run_config(base_flags, row, seed_index, output, config_file)
    if device is not None:
        cfg = dataclasses.replace(cfg, device=device)
    result = {"row": row, "seed_index": seed_index, "seed": cfg.seed}
    t0 = time.time()
    try:
        summary = train(cfg)
        result.update(status="ok", best_top1=summary["best_top1"], final_top1=summary["final_top1"],
                      images_per_s=summary["images_per_s"])
    except TrainingDiverged as e:
        result.update(status="diverged", message=str(e), best_top1=None, final_top1=None, images_per_s=None)
    result["wall_time_s"] = round(time.time() - t0, 1)
    if (out / "last.pth").is_file():
        result.update(_complexity(out, cfg.img_size))
    # a result exists only once the run is over
    atomic_write(done, lambda f: f.write(json.dumps(result, indent=2).encode()))
    return result


def _worker(args) -> None:
    base_flags, jobs, output, config_file, device = args
    for row, k in jobs:
        run_one(base_flags, row, k, Path(output), config_file, device)


def run_grid(rows: list[str], seeds: int, base_flags: dict, output: Path, config_file: str | None = None,
             devices: list[str] | None = None) -> list[dict]:
    jobs = [(row, k) for row in rows for k in range(seeds)]
    if devices and len(devices) > 1:
        import multiprocessing as mp

        # One process per device; jobs dealt round-robin. Each process runs the normal trainer.
        ctx = mp.get_context("spawn")
        shares = [(base_flags, jobs[i::len(devices)], str(output), config_file, d) for i, d in enumerate(devices)]
        with ctx.Pool(len(devices)) as pool:
            pool.map(_worker, shares)
    else:
        device = devices[0] if devices else None
        for row, k in jobs:
            run_one(base_flags, row, k, output, config_file, device)
    return [json.loads((row_dir(output, r, k) / ROW_RESULT).read_text()) for r, k in jobs]


# ----- the report -----

def summarise(results: list[dict]) -> list[dict]:
    by_row: dict[str, list[dict]] = {}
    for r in results:
        by_row.setdefault(r["row"], []).append(r)
    table = []
    for row, runs in by_row.items():
        _, what, paper_params, paper_macs, paper_top1 = ABLATIONS[row]
        ok = [r["best_top1"] for r in runs if r["status"] == "ok"]
        table.append({
            "row": row, "change": what, "params": runs[0].get("params"), "gmacs": runs[0].get("gmacs"),
            "images_per_s": statistics.mean(r["images_per_s"] for r in runs if r["images_per_s"]) if ok else None,
            "top1_mean": statistics.mean(ok) if ok else None,
            "top1_std": statistics.stdev(ok) if len(ok) > 1 else 0.0 if ok else None,
            "runs": len(runs), "diverged": sum(r["status"] == "diverged" for r in runs),
            "paper_top1": paper_top1, "paper_params": paper_params, "paper_gmacs": paper_macs,
        })
    return table


def spearman(table: list[dict]) -> tuple[float | None, int]:
    """Rank correlation between measured and paper top-1 over rows that have both (diverged = lowest)."""
    pairs = [(-1.0 if t["top1_mean"] is None else t["top1_mean"], t["paper_top1"]) for t in table
             if t["paper_top1"] is not None]
    if len(pairs) < 3:
        return None, len(pairs)
    spearmanr = require("scipy.stats", "train", "the rank correlation of the ablation report").spearmanr

    rho = spearmanr([p[0] for p in pairs], [p[1] for p in pairs]).statistic
    return (None if math.isnan(rho) else float(rho)), len(pairs)


def _fmt_top1(t: dict) -> str:
    if t["top1_mean"] is None:
        return "diverged"
    s = f"{t['top1_mean']:.2f}"
    if t["runs"] > 1:
        s += f" ± {t['top1_std']:.2f}"
    if t["diverged"]:
        s += f" ({t['diverged']} diverged)"
    return s


def write_report(table: list[dict], output: Path, command: str, base_flags: dict, budget: str,
                 config_file: str | None) -> Path:
    import csv

    matplotlib = require("matplotlib", "train", "the ablation chart")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rho, n = spearman(table)
    lines = [
        "# Ablation grid (paper Table 5)", "",
        f"Command: `{command}`", "",
        f"Budget: `{budget}`; flags on top of `metaformer train`'s defaults: `{json.dumps(base_flags)}`"
        + (f"; config file `{config_file}`" if config_file else ""), "",
        "| row | change | params | GMACs | images/s (train) | measured top-1 | paper ImageNet top-1 |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for t in table:
        params = f"{t['params'] / 1e6:.2f}M" if t["params"] else ""
        gmacs = f"{t['gmacs']:.3f}" if t["gmacs"] else ""
        ips = f"{t['images_per_s']:.0f}" if t["images_per_s"] else ""
        paper = "" if t["paper_top1"] is None else f"{t['paper_top1']:.1f}"
        lines.append(f"| {t['row']} | {t['change']} | {params} | {gmacs} | {ips} | {_fmt_top1(t)} | {paper} |")
    lines += ["", f"Spearman rank correlation, measured vs paper, over {n} rows: "
              + ("n/a (fewer than 3 rows with a paper figure, or constant)" if rho is None else f"{rho:.2f}"), ""]
    md = output / "report.md"
    md.write_text("\n".join(lines) + "\n")
    with open(output / "report.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)

    fig, ax = plt.subplots(figsize=(9, 0.35 * len(table) + 1.5))
    ys = range(len(table))
    measured = [t["top1_mean"] or 0.0 for t in table]
    ax.barh([y - 0.2 for y in ys], measured, height=0.4, xerr=[t["top1_std"] or 0 for t in table],
            label="measured (this grid)", color="tab:blue")
    ax.barh([y + 0.2 for y in ys], [t["paper_top1"] or 0.0 for t in table], height=0.4,
            label="paper (ImageNet-1K)", color="tab:gray")
    for y, t in zip(ys, table):
        if t["top1_mean"] is None:
            ax.text(1, y - 0.2, "diverged", va="center", fontsize=8, color="tab:red")
    ax.set_yticks(list(ys), [t["row"] for t in table])
    ax.invert_yaxis()
    ax.set_xlabel("top-1 (%)")
    ax.set_title("PoolFormer-S12 ablations" + ("" if rho is None else f" (Spearman vs paper {rho:.2f})"))
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(output / "report.png", dpi=120)
    plt.close(fig)
    return md


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in ["metaformer"] + sys.argv[1:])
