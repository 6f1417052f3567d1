"""The ablation grid's report: a table with intervals (markdown and CSV), the questions it answers, a chart.

The statistics are :mod:`.ablate_stats`'; this module only lays them out."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import require
from . import ablate_stats as S
from .ablate import Grid

# The questions users ask the lab (the paper's, and the authors' issue tracker's), as rows compared with
# the reference row; the report says for each whether this grid's budget resolves it.
QUESTIONS = {
    "identity": "Does the token mixer matter (identity instead of pooling)?",
    "pool_no_subtract": "Pooling without subtracting the input, pool(x) instead of pool(x) - x?",
    "pool_no_residual": "Neither the residual nor the subtraction, pool(norm(x)) instead of x + pool(norm(x)) - "
                        "norm(x)?",
    "dwconv": "A depthwise conv instead of pooling?",
}


def _top1(result: dict) -> float | None:
    return result.get("final_top1")


def summarise(grid: Grid, results: list[dict]) -> tuple[list[dict], dict]:
    """``(table, summary)``: one row per grid row with its interval and its paired difference from the
    reference row; the summary holds the rank correlation with the paper and what the grid resolves."""
    by_row: dict[str, dict[int, dict]] = {r.name: {} for r in grid.rows}
    for r in results:
        if r["row"] in by_row:
            by_row[r["row"]][r["seed_index"]] = r
    ok = {name: {k: _top1(r) for k, r in runs.items() if r["status"] == "ok"} for name, runs in by_row.items()}
    ref = ok.get(grid.reference, {})
    paper_ref = next((r.paper_top1 for r in grid.rows if r.name == grid.reference), None)
    table = []
    for row in grid.rows:
        runs = by_row[row.name]
        top = S.mean_interval([ok[row.name][k] for k in sorted(ok[row.name])])
        diff = S.paired_difference(ok[row.name], ref) if row.name != grid.reference else None
        first = next(iter(runs.values()), {})
        speeds = [r["images_per_s"] for r in runs.values() if r.get("images_per_s")]
        table.append({
            "row": row.name, "change": row.change, "params": first.get("params"), "gmacs": first.get("gmacs"),
            "images_per_s": sum(speeds) / len(speeds) if speeds else None,
            "runs": len(runs), "diverged": sum(r["status"] == "diverged" for r in runs.values()),
            "top1_mean": top.mean, "top1_sd": top.sd, "top1_lo": top.lo, "top1_hi": top.hi,
            "diff_mean": diff.mean if diff else None, "diff_lo": diff.lo if diff else None,
            "diff_hi": diff.hi if diff else None, "diff_sd": diff.sd if diff else None,
            "diff_seeds": diff.n if diff else None, "verdict": S.verdict(diff) if diff else "reference",
            "paper_top1": row.paper_top1,
            "paper_diff": None if row.paper_top1 is None or paper_ref is None or row.name == grid.reference
            else row.paper_top1 - paper_ref,
            "paper_params": row.paper_params, "paper_gmacs": row.paper_gmacs,
        })
    return table, _summary(grid, table, ok)


def _summary(grid: Grid, table: list[dict], ok: dict) -> dict:
    with_paper = [t for t in table if t["paper_top1"] is not None]
    measured = [-1.0 if t["top1_mean"] is None else t["top1_mean"] for t in with_paper]
    paper = [t["paper_top1"] for t in with_paper]
    rho = S.spearman(measured, paper)
    ci = S.spearman_bootstrap([list(ok[t["row"]].values()) for t in with_paper], paper) if rho is not None else None
    diffs = [S.Interval(t["diff_mean"], t["diff_lo"], t["diff_hi"], t["diff_seeds"], t["diff_sd"]) for t in table
             if t["diff_seeds"] and t["diff_lo"] is not None]
    widths = sorted(d.half_width for d in diffs)
    sd = S.pooled_sd(diffs)
    seeds = [t["runs"] - t["diverged"] for t in table]
    return {
        "spearman": rho, "spearman_lo": ci[0] if ci else None, "spearman_hi": ci[1] if ci else None,
        "spearman_rows": len(with_paper), "bootstrap_resamples": S.BOOTSTRAP_RESAMPLES,
        "seeds": grid.seeds, "seeds_min": min(seeds) if seeds else 0,
        "half_width_min": widths[0] if widths else None, "half_width_median": widths[len(widths) // 2]
        if widths else None, "half_width_max": widths[-1] if widths else None,
        "pooled_diff_sd": sd, "seeds_for_target": S.seeds_needed(sd) if sd else None,
        "target": S.RESOLVE_TARGET, "reference": grid.reference,
    }


# ----- writing

def _pm(lo, hi, digits=2) -> str:
    return "" if lo is None else f" [{lo:.{digits}f}, {hi:.{digits}f}]"


def _signed(v, digits=2) -> str:
    return f"{v:+.{digits}f}"


def _top1_cell(t: dict) -> str:
    if t["top1_mean"] is None:
        return "diverged" if t["diverged"] else "no result"
    s = f"{t['top1_mean']:.2f}{_pm(t['top1_lo'], t['top1_hi'])}"
    return s + (f" ({t['diverged']} diverged)" if t["diverged"] else "")


def _diff_cell(t: dict) -> str:
    if t["diff_mean"] is None:
        return ""
    if t["diff_lo"] is None:
        return _signed(t["diff_mean"])
    return f"{_signed(t['diff_mean'])} [{_signed(t['diff_lo'])}, {_signed(t['diff_hi'])}]"


def answer(t: dict, reference: str) -> str:
    """One sentence: what the grid says about ``row - reference``."""
    if t["diff_mean"] is None:
        return f"no paired result yet ({t['row']} or {reference} has not finished a common seed)"
    if t["diff_lo"] is None:
        return f"{_signed(t['diff_mean'])} points on {t['diff_seeds']} seed: no interval, so not resolved"
    where = {"resolved below": "resolved: worse", "resolved above": "resolved: better"}.get(
        t["verdict"], f"not resolved: this budget cannot tell it from {reference} (the interval holds 0)")
    return (f"{_signed(t['diff_mean'])} points [{_signed(t['diff_lo'])}, {_signed(t['diff_hi'])}] over "
            f"{t['diff_seeds']} paired seeds, {where}")


def _timing(t: dict | None) -> str:
    if not t or not t.get("cells"):
        return ""
    runs = "" if t["invocations"] == 1 else f" over {t['invocations']} invocations"
    return f"; {t['cells']} cells trained in {t['wall_s'] / 60:.1f} min of wall time{runs}"


def markdown(grid: Grid, table: list[dict], summary: dict, missing: list[str], timing: dict | None) -> str:
    ref = grid.reference
    lines = [
        "# Ablation grid (paper Table 5)", "",
        f"Command: `{grid.command}`", "",
        f"Budget: `{grid.budget}`; options on top of `metaformer train`'s defaults: `{json.dumps(grid.flags)}`"
        + (f"; config file `{grid.config}`" if grid.config else "")
        + f"; {grid.seeds} seed(s) per row{_timing(timing)}.", "",
        f"Top-1 is each run's at the end of its schedule (the val split), as the mean over seeds with its 95% t "
        f"interval; Δ is the paired difference from `{ref}` on the same seeds, with its 95% t interval: "
        "*resolved* when the interval excludes 0. Paper: ImageNet-1K top-1 and its difference from the paper's "
        f"`{ref}`.", "",
        f"| row | change | params | GMACs | images/s | top-1 [95% CI] | Δ vs {ref} [95% CI] | verdict | paper top-1 "
        "| paper Δ |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for t in table:
        params = f"{t['params'] / 1e6:.2f}M" if t["params"] else ""
        gmacs = f"{t['gmacs']:.3f}" if t["gmacs"] else ""
        ips = f"{t['images_per_s']:.0f}" if t["images_per_s"] else ""
        paper = "" if t["paper_top1"] is None else f"{t['paper_top1']:.1f}"
        pdiff = "" if t["paper_diff"] is None else f"{t['paper_diff']:+.1f}"
        verdict = "" if t["verdict"] == "reference" else t["verdict"]
        lines.append(f"| {t['row']} | {t['change']} | {params} | {gmacs} | {ips} | {_top1_cell(t)} | {_diff_cell(t)} "
                     f"| {verdict} | {paper} | {pdiff} |")
    s = summary
    lines += ["", "## What this grid resolves", ""]
    if s["half_width_median"] is None:
        lines.append(f"Nothing yet: paired intervals need at least 2 seeds of a row and of `{ref}` (--seeds 2 or more).")
    else:
        lines.append(
            f"A difference from `{ref}` is resolved when it exceeds its interval's half-width: here "
            f"{s['half_width_min']:.2f} to {s['half_width_max']:.2f} points (median {s['half_width_median']:.2f}). "
            f"The paired differences' pooled seed-to-seed standard deviation is {s['pooled_diff_sd']:.2f} points, so "
            + (f"resolving a {s['target']:.0f}-point difference needs about {s['seeds_for_target']} seeds"
               if s["seeds_for_target"] else f"a {s['target']:.0f}-point difference is beyond 100 seeds")
            + f" (this grid has {s['seeds']}).")
    lines += [""]
    asked = [t for t in table if t["row"] in QUESTIONS]
    if asked:
        lines += ["Questions:", ""]
        for t in asked:
            lines.append(f"- {QUESTIONS[t['row']]} `{t['row']}` - `{ref}`: {answer(t, ref)}.")
        lines.append("")
    if s["spearman"] is None:
        lines.append(f"Spearman rank correlation with the paper: n/a ({s['spearman_rows']} rows with a paper figure; "
                     "needs 3, not all tied).")
    else:
        ci = ("" if s["spearman_lo"] is None else
              f", 95% bootstrap interval [{s['spearman_lo']:.2f}, {s['spearman_hi']:.2f}] ({s['bootstrap_resamples']:,} "
              "resamples of the rows and, within each, of its seeds)")
        lines.append(f"Spearman rank correlation, measured vs paper, over {s['spearman_rows']} rows: "
                     f"{s['spearman']:.2f}{ci}.")
    if missing:
        lines += ["", f"Not finished ({len(missing)} cell(s), not in the table): {', '.join(missing)}."]
    return "\n".join(lines) + "\n"


def write_report(grid: Grid, results: list[dict], output: Path, missing: list[str] | None = None,
                 timing: dict | None = None) -> tuple[Path, list[dict], dict]:
    """``report.md``, ``report.csv`` and ``report.png`` in ``output``; returns the markdown's path, the table and
    the summary."""
    import csv

    table, summary = summarise(grid, results)
    md = output / "report.md"
    md.write_text(markdown(grid, table, summary, missing or [], timing))
    with open(output / "report.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)
    chart(table, summary, output / "report.png", grid.reference)
    return md, table, summary


def chart(table: list[dict], summary: dict, path: Path, reference: str) -> None:
    """Left: each row's top-1 with its 95% interval, beside the paper's; right: the paired difference from
    the reference with its interval (filled: resolved)."""
    matplotlib = require("matplotlib", "train", "the ablation chart")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(table)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 0.38 * n + 2.2), sharey=True,
                                 gridspec_kw={"width_ratios": [3, 2]})
    ys = list(range(n))

    def err(t, m, lo, hi):
        return [[0 if t[lo] is None else t[m] - t[lo]], [0 if t[hi] is None else t[hi] - t[m]]]

    for y, t in zip(ys, table):
        if t["top1_mean"] is not None:
            ax.barh(y - 0.2, t["top1_mean"], height=0.4, color="tab:blue", xerr=err(t, "top1_mean", "top1_lo",
                                                                                    "top1_hi"), capsize=2)
        else:
            ax.text(1, y - 0.2, "diverged" if t["diverged"] else "no result", va="center", fontsize=8,
                    color="tab:red")
        if t["paper_top1"] is not None:
            ax.barh(y + 0.2, t["paper_top1"], height=0.4, color="tab:gray")
        if t["diff_mean"] is not None:
            resolved = t["verdict"].startswith("resolved")
            bx.errorbar(t["diff_mean"], y, xerr=err(t, "diff_mean", "diff_lo", "diff_hi"), fmt="o", capsize=3,
                        color="tab:blue" if resolved else "tab:orange", mfc=None if resolved else "white")
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    ax.set_yticks(ys, [t["row"] for t in table])
    ax.invert_yaxis()
    ax.set_xlim(0, 100)  # an interval wider than that (two seeds) is cut at the axis
    ax.set_xlabel("top-1 (%)")
    ax.legend(handles=[Patch(color="tab:blue", label="measured: mean and 95% CI over seeds"),
                       Patch(color="tab:gray", label="paper (ImageNet-1K)")], loc="upper center", fontsize=8,
              bbox_to_anchor=(0.5, -0.5 / (0.38 * n + 1.8)), ncol=2, frameon=False)
    rho = summary["spearman"]
    title = "MetaFormer ablations" + ("" if rho is None else f" (Spearman vs paper {rho:.2f}"
                                      + ("" if summary["spearman_lo"] is None else
                                         f" [{summary['spearman_lo']:.2f}, {summary['spearman_hi']:.2f}]") + ")")
    ax.set_title(title, fontsize=10)
    bx.axvline(0, color="black", lw=0.8)
    bx.set_xlabel(f"Δ top-1 vs {reference}, paired over seeds (points)")
    bx.legend(handles=[Line2D([], [], marker="o", ls="", color="tab:blue", label="resolved (95% CI excludes 0)"),
                       Line2D([], [], marker="o", ls="", color="tab:orange", mfc="white", label="not resolved")],
              loc="upper center", fontsize=8, bbox_to_anchor=(0.5, -0.5 / (0.38 * n + 1.8)), ncol=2, frameon=False)
    for a in (ax, bx):
        a.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
