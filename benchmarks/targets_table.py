"""Combine the issue-4 target runs of ``run_targets.sh`` into one markdown report.

Reads ``benchmarks/results/malloc-{kept,default}/{fp32_b32,bf16_b32,train_b32,fp32_b1}.json`` and
prints, per table, every mode under both allocator conditions, then each target's ratio.

    python benchmarks/targets_table.py [--results benchmarks/results] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

TABLES = [("fp32_b32", "fp32, PoolFormer-S12, 224, batch 32"), ("bf16_b32", "bf16, PoolFormer-S12, 224, batch 32"),
          ("train_b32", "Training step (forward, backward, AdamW), fp32, PoolFormer-S12, 224, batch 32"),
          ("fp32_b1", "fp32, PoolFormer-S12, 224, batch 1")]
CONDITIONS = [("kept", "freed memory kept (the CLI's default)"), ("default", "glibc default")]
OURS = ("fused", "fused_compile", "ort")


def load(results: Path) -> dict:
    runs = {}
    for cond, _ in CONDITIONS:
        for name, _ in TABLES:
            path = results / f"malloc-{cond}" / f"{name}.json"
            if path.exists():
                data = json.loads(path.read_text())
                runs[cond, name] = {"env": data["environment"],
                                    "rows": {r["mode"]: r for r in data["results"] if r["images_per_s"]}}
    return runs


def ips(row) -> str:
    return f"{row['images_per_s']:.1f} ({row['images_per_s_min']:.1f}-{row['images_per_s_max']:.1f})"


def table(runs: dict, name: str, title: str) -> list[str]:
    present = [c for c, _ in CONDITIONS if (c, name) in runs]
    if not present:
        return []
    modes = list(dict.fromkeys(m for c in present for m in runs[c, name]["rows"]))
    train = name.startswith("train")
    head = "| mode | " + " | ".join(f"images/s, {dict(CONDITIONS)[c]}" for c in present)
    head += " | peak MiB |" if train else " | max abs logit diff (vs) |"
    out = [f"### {title}", "", head, "|---|" + "---:|" * len(present) + "---|"]
    for mode in modes:
        rows = [runs[c, name]["rows"].get(mode) for c in present]
        cells = [ips(r) if r else "" for r in rows]
        first = next(r for r in rows if r)
        if train:
            extra = f"{first['peak_mem_mib']:.0f}" if first.get("peak_mem_mib") else ""
        elif mode == "gemm_ceiling":
            extra = " / ".join(f"GEMM {r['extra']['gemm_gflops']:.0f} GFLOP/s" for r in rows if r)
        else:
            extra = f"{first['max_abs_diff']:.1e} ({first['diff_ref']})" if first.get("max_abs_diff") is not None else ""
        out.append(f"| {mode} | " + " | ".join(cells) + f" | {extra} |")
    return out + [""]


def ratio(runs, cond, name, a, b, what="images_per_s"):
    rows = runs.get((cond, name), {}).get("rows", {})
    if isinstance(a, tuple):  # the best of several modes
        a = max((m for m in a if m in rows), key=lambda m: rows[m][what], default=None)
    if isinstance(b, tuple):
        b = max((m for m in b if m in rows), key=lambda m: rows[m][what], default=None)
    if a not in rows or b not in rows:
        return None, a, b
    return rows[a][what] / rows[b][what], a, b


def targets(runs: dict) -> list[str]:
    checks = [  # (target, table, ours, reference, threshold)
        ("CPU eager >= 1.1x timm channels_last (fp32 b32)", "fp32_b32", "fused", "timm_cl", 1.1),
        ("CPU eager >= 1.6x timm NCHW (fp32 b32)", "fp32_b32", "fused", "timm_eager", 1.6),
        ("fastest fp32 path >= 0.9 of the GEMM ceiling (b32)", "fp32_b32", OURS, "gemm_ceiling", 0.9),
        ("fastest fp32 path ahead of timm compiled and ORT (b32)", "fp32_b32", OURS, ("timm_compile", "timm_ort"), 1.0),
        ("fastest fp32 path >= 0.9 of the GEMM ceiling (b1)", "fp32_b1", OURS, "gemm_ceiling", 0.9),
        ("fastest fp32 path ahead of timm compiled and ORT (b1)", "fp32_b1", OURS, ("timm_compile", "timm_ort"), 1.0),
        ("bf16 >= 1.3x timm's best bf16 (b32)", "bf16_b32", ("fused", "fused_compile"), ("timm_cl", "timm_compile"),
         1.3),
        ("training >= 1.2x timm channels_last (fp32 b32)", "train_b32", "fast", "timm_cl", 1.2),
    ]
    out = ["| target | " + " | ".join(dict(CONDITIONS)[c] for c, _ in CONDITIONS) + " |",
           "|---|" + "---|" * len(CONDITIONS)]
    for label, name, a, b, need in checks:
        cells = []
        for cond, _ in CONDITIONS:
            r, ma, mb = ratio(runs, cond, name, a, b)
            verdict = "met" if r is not None and r >= need else "not met"
            if r is not None and need == 1.0 and abs(r - 1) < 0.02:
                verdict = "tie, within 2%: not met"  # "ahead" needs more than run-to-run noise
            cells.append("not run" if r is None else f"{ma} / {mb} = **{r:.2f}x** ({verdict})")
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    cells = []
    for cond, _ in CONDITIONS:
        r, _, _ = ratio(runs, cond, "train_b32", "fast", "timm_cl", "peak_mem_mib")
        cells.append("not run" if r is None else f"fast / timm_cl = **{r:.2f}x** ({'met' if r <= 0.8 else 'not met'})")
    out.append("| training peak memory <= 0.8x timm's | " + " | ".join(cells) + " |")
    return out + [""]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default="benchmarks/results")
    p.add_argument("--out", default=None, help="also write the report here")
    args = p.parse_args()
    runs = load(Path(args.results))
    if not runs:
        raise SystemExit(f"no results under {args.results}/malloc-*/: run sh benchmarks/run_targets.sh first")
    env = next(iter(runs.values()))["env"]
    lines = [f"{env['cpu']}, {env['threads']} threads; Python {env['python']}, torch {env['torch']}, "
             f"timm {env['timm']}, onnxruntime {env['onnxruntime']}; {env['time']}", ""]
    for name, title in TABLES:
        lines += table(runs, name, title)
    lines += ["### Targets", ""] + targets(runs)
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
