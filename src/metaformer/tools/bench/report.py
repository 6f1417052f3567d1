"""The results: one :class:`Result` per mode and configuration, as a markdown table or as JSON beside the
environment they were measured in."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

from .environment import environment


@dataclass
class Result:
    task: str  # "infer" or "train"
    mode: str
    variant: str
    batch: int
    img_size: int
    dtype: str
    device: str
    images_per_s: float = float("nan")
    images_per_s_min: float = float("nan")
    images_per_s_max: float = float("nan")
    latency_ms: float = float("nan")  # median time of one call (one batch)
    max_abs_diff: float | None = None
    diff_ref: str | None = None
    peak_mem_mib: float | None = None
    gflop_per_image: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


def markdown_table(results: list[Result]) -> str:
    lines = ["| task | variant | batch | size | dtype | mode | images/s (median) | min-max | latency ms | "
             "max abs diff (vs) | peak MiB | note |",
             "|---|---|---:|---:|---|---|---:|---|---:|---|---:|---|"]
    for r in results:
        diff = "" if r.max_abs_diff is None else f"{r.max_abs_diff:.2e} ({r.diff_ref})"
        mem = "" if r.peak_mem_mib is None else f"{r.peak_mem_mib:.0f}"
        note = r.note
        if r.mode == "gemm_ceiling" and "gemm_gflops" in r.extra:
            note = (note + f" GEMM {r.extra['gemm_gflops']:.0f} GFLOP/s; model "
                    f"{r.gflop_per_image:.3f} GFLOP/image").strip()
        lines.append(f"| {r.task} | {r.variant} | {r.batch} | {r.img_size} | {r.dtype} | {r.mode} | "
                     f"{r.images_per_s:.1f} | {r.images_per_s_min:.1f}-{r.images_per_s_max:.1f} | "
                     f"{r.latency_ms:.1f} | {diff} | {mem} | {note} |")
    return "\n".join(lines)


def save_json(results: list[Result], path: str, argv: list[str] | None = None) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump({"environment": environment(), "command": argv, "results": [asdict(r) for r in results]},
                  f, indent=1, default=float)
