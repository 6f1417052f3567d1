"""Every GPU check and measurement in one run, in the order that decides the targets first: the GEMM tuning
the fused model uses, the inference benchmark against timm (eager and max-autotune), the kernels' bandwidths,
the training benchmark (speed and peak memory), the fused logits against float32, the Triton tests compiled
for the device; then what has never run on CUDA (the compiled fast training path, the digits runs with
``train --compile`` and fp16, DDP over NCCL) and the rest. Writes ``gpu_check.json`` and ``gpu_check.md``
to ``--out`` after every section (a run cut short keeps what it measured) and prints the targets last.

    python benchmarks/gpu_check.py --out DIR --budget 480    # on a CUDA machine: one device window
    python benchmarks/gpu_check.py --out DIR --dry-run       # the same code on the CPU at tiny sizes
    python benchmarks/gpu_check.py --out DIR --only bench_infer,bench_train

``--budget`` is hard: a section that would not fit (by its usual cost) is skipped, and one still running
when the budget is spent is stopped; both are marked in the report. ``--inductor-cache FILE.tar.gz`` carries
the compile caches (inductor's FX-graph and autotuning caches, and Triton's kernels) between runs: read at
the start when the file exists, written to ``--out`` after the sections with long compiles and at the end.
It installs nothing: run it where torch (and, for the kernels, Triton) is installed, with this checkout on
``PYTHONPATH`` (``PYTHONPATH=src``) or our wheel installed (``docs/fast.md``).
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import copy
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
DRY = "--dry-run" in sys.argv
if DRY:  # Triton's interpreter on the CPU; must be set before anything imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(HERE))
import traffic  # noqa: E402

import metaformer  # noqa: E402
from metaformer.fast import fuse  # noqa: E402
from metaformer.tools import bench  # noqa: E402

CL = torch.channels_last
# The GPU issue's targets (PoolFormer-S12, 224, bf16, same weights): ratio >= bar, or <= for memory and logits
TARGETS = {
    "infer: fused / timm_eager (bf16 b256)": 2.5,
    "infer: fused / timm_compile max-autotune (bf16 b256)": 1.3,
    "kernels: share of copy bandwidth (worst)": 0.6,
    "train: fast / timm_eager (bf16 b128)": 1.5,
    "train: fast / timm_compile (bf16 b128)": 1.1,
    "train: peak memory fast / timm_eager": 0.7,
    "train: peak memory fast / timm_compile": 0.7,
    "fused bf16: rel. diff to fp32 / plain bf16's": 1.0,
    "fused fp32 (TF32 off): rel. diff to plain": 1e-5,
}


class BudgetSpent(BaseException):
    """The run's --budget ran out inside a section (BaseException: a section's own ``except Exception`` must
    not swallow it)."""


class Check:
    """Sizes and switches: the device run, or the CPU dry run (same code, tiny sizes, no compiling)."""

    def __init__(self, dry: bool, out: Path):
        self.dry, self.out = dry, out
        self.device = torch.device("cpu" if dry else "cuda")
        self.img = 64 if dry else 224
        self.batch_infer = 2 if dry else 256
        self.batch_train = 2 if dry else 128
        self.tiny = dict(depths=(1, 1, 2, 1), dims=(16, 32, 64, 128)) if dry else {}
        self.compile = not dry  # inductor compiles take minutes on a 2-core CPU
        self.results: dict = {}
        self.gemm_table: dict | None = None  # the fused model's GEMM choices (gemm_tune, or --gemm-table)
        self.cache: Path | None = None  # the compile caches' folder, with --inductor-cache
        self.cache_archive: Path | None = None
        self.deadline: float | None = None  # time.time() at which the budget is spent

    def model(self, name: str, **kw):
        torch.manual_seed(0)
        m = metaformer.create_model(name, img_size=self.img, **{**self.tiny, **kw}).eval()
        bench.randomize_affine(m)
        return m

    def fuse_kwargs(self) -> dict:
        """fuse() options of the benchmarks' fused modes: the GEMM table; in the dry run the Triton backend (fuse
        would pick oneDNN on the CPU), so the dry run goes through the device's path."""
        return {**({"gemm": self.gemm_table} if self.gemm_table else {}), **({"backend": "triton"} if self.dry else {})}

    def left(self, cap: float) -> float:
        """Seconds a subprocess may take: ``cap``, or what is left of the budget if less."""
        return cap if self.deadline is None else max(1.0, min(cap, self.deadline - time.time()))

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "gpu_check.json").write_text(json.dumps(self.results, indent=1, default=str))
        (self.out / "gpu_check.md").write_text(report(self.results))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def timed(fn, device: torch.device, repeats: int = 20, warmup: int = 3) -> float:
    """Median seconds per call (device events on CUDA): the benchmark harness's own timer."""
    return bench.median_time(fn, device, repeats, warmup)


def timed_graph(fn, device: torch.device, calls: int = 10, repeats: int = 10) -> float:
    """Median seconds per call with ``calls`` calls captured in one CUDA graph and replayed: the kernels'
    own time, without the host's launch gaps (the host clock on the CPU)."""
    if device.type != "cuda":
        return timed(fn, device, repeats=2, warmup=1)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return timed(graph.replay, device, repeats=repeats, warmup=2) / calls


# ----------------------------------------------------------------------------- compile caches
CACHE_LIMIT = 15 * 2 ** 20  # the device tool brings back files of at most 16 MiB
BINARY = (".so", ".cubin", ".ptx", ".llir", ".ttir", ".ttgir", ".o", ".hsaco", ".json.tmp")


def use_cache(c: Check, archive: Path) -> dict:
    """Point inductor and Triton at a fresh folder, filled from ``archive`` when it exists; returns what was read."""
    c.cache = Path(tempfile.mkdtemp(prefix="gpu-check-cache-"))
    atexit.register(shutil.rmtree, c.cache, ignore_errors=True)
    c.cache_archive = archive
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(c.cache)
    os.environ["TRITON_CACHE_DIR"] = str(c.cache / "triton")
    if not archive.exists():
        return {"read": None, "note": f"{archive} not there: compiling cold"}
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        try:
            tar.extractall(c.cache, filter="data")
        except TypeError:  # a Python without extraction filters
            tar.extractall(c.cache, members=[m for m in members if not (m.name.startswith("/") or ".." in m.name)])
    return {"read": str(archive), "files": len(members), "bytes": archive.stat().st_size}


def save_cache(folder: Path, archive: Path, limit: int = CACHE_LIMIT) -> dict:
    """``folder`` as a .tar.gz of at most ``limit`` bytes: everything, or, if that is too large, without the
    compiled binaries (inductor then rebuilds its kernels from the cached code, but keeps every autotuning
    choice and graph). Written beside and renamed into place."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    tmp = archive.with_name(archive.name + ".part")
    for binaries in (True, False):
        files = [p for p in sorted(folder.rglob("*")) if p.is_file() and (binaries or not p.name.endswith(BINARY))]
        with tarfile.open(tmp, "w:gz") as tar:
            for p in files:
                tar.add(p, arcname=str(p.relative_to(folder)))
        if tmp.stat().st_size <= limit:
            tmp.replace(archive)
            return {"written": str(archive), "files": len(files), "bytes": archive.stat().st_size,
                    "binaries": binaries}
    tmp.unlink()
    return {"written": None, "note": f"over {limit} bytes even without the binaries"}


# ----------------------------------------------------------------------------- sections
def sec_env(c: Check) -> dict:
    env = bench.environment()
    with contextlib.suppress(Exception):
        env["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,"
                                            "clocks.mem,power.limit", "--format=csv"], capture_output=True,
                                           text=True, timeout=20).stdout.strip()
    return env


def sec_ceilings(c: Check) -> dict:
    """A large device-to-device copy (bytes read + written) through torch and through a Triton kernel,
    and a bf16 GEMM: the ceilings every kernel and mode is compared with."""
    from metaformer.fast import triton_ops as T

    n = (1 << 16) if c.dry else (1 << 30)  # 2 GiB of bf16 on the device: far beyond the 60 MB L2
    g = torch.Generator(device=c.device).manual_seed(0)
    src = torch.randn(n, device=c.device, generator=g, dtype=torch.float32).to(torch.bfloat16)
    dst = torch.empty_like(src)
    out = {}
    t = timed(lambda: dst.copy_(src), c.device, repeats=5 if c.dry else 20)
    out["torch_copy_GBps"] = 2 * src.numel() * 2 / t / 1e9
    t = timed(lambda: T.copy(src, dst), c.device, repeats=2 if c.dry else 20)
    assert torch.equal(dst, src)
    out["triton_copy_GBps"] = 2 * src.numel() * 2 / t / 1e9
    m = 256 if c.dry else 8192
    a = torch.randn(m, m, device=c.device, generator=g).to(torch.bfloat16)
    b = torch.randn(m, m, device=c.device, generator=g).to(torch.bfloat16)
    t = timed(lambda: a @ b, c.device, repeats=3 if c.dry else 10)
    out["bf16_gemm_TFLOPs"] = 2 * m ** 3 / t / 1e12
    out["copy_GBps"] = max(out["torch_copy_GBps"], out["triton_copy_GBps"])
    return out


def sec_gemm_tune(c: Check) -> dict:
    """The fused S12's GEMM choices at the inference shape (bf16, batch 256): every Triton tile and cuBLASLt
    timed per shape by ``metaformer.fast.tuning.tune``; the table is written to ``gemm_table.json`` and used by
    every fused model below. With ``--gemm-table`` the given table is used instead."""
    from metaformer.fast import triton_ops as T
    from metaformer.fast import tuning

    if c.gemm_table is not None:
        return {"table": "from --gemm-table", "entries": _table_rows(c.gemm_table)}
    m = c.model("poolformer_s12").to(c.device, torch.bfloat16)
    f = fuse(m, backend="triton")
    g = torch.Generator(device=c.device).manual_seed(7)
    x = torch.randn(c.batch_infer, 3, c.img, c.img, device=c.device, generator=g).to(torch.bfloat16)
    table = tuning.tune(f, x, configs=T.GEMM_CONFIGS[:2] if c.dry else None)
    c.out.mkdir(parents=True, exist_ok=True)
    (c.out / "gemm_table.json").write_text(json.dumps(table, indent=1))
    c.gemm_table = table
    return {"table": str(c.out / "gemm_table.json"), "entries": _table_rows(table)}


def _table_rows(table: dict) -> dict:
    """Per GEMM shape: the choice, its time, the default tile's time, how many candidates ran and failed."""
    return {key: {"choice": e["impl"] + ("" if not e.get("config") else " " + json.dumps(e["config"])),
                  "ms": e.get("ms"), "default_ms": e.get("default_ms"), "candidates": len(e.get("times_ms") or {}),
                  "failed": len(e.get("errors") or {})} for key, e in table["entries"].items()}


def sec_bench_infer(c: Check) -> dict:
    """Fused (with the tuned GEMMs, eager and replayed from a CUDA graph) against timm eager and timm
    ``torch.compile(mode="max-autotune")``, one interleaved run."""
    modes = ["eager_cl", "fused", "fused_graph", "timm_eager", "timm_cl"]
    if c.compile:
        modes.append("timm_compile")
    if c.dry:
        modes.remove("fused_graph")
    rows = bench.bench_inference("poolformer_s12", modes, c.batch_infer, c.img, "bf16", str(c.device),
                                 repeats=3 if c.dry else 10, warmup=1 if c.dry else 3, log=print,
                                 fuse_kwargs=c.fuse_kwargs(), **c.tiny)
    return _bench_rows(rows)


def sec_bench_infer_ours_compiled(c: Check) -> dict:
    """Our fused model's portable math under max-autotune beside the Triton path (no target: what inductor
    makes of the same algebra)."""
    if not c.compile:
        return {"skipped": "compiles only on the device"}
    rows = bench.bench_inference("poolformer_s12", ["fused", "fused_compile"], c.batch_infer, c.img, "bf16",
                                 str(c.device), repeats=10, warmup=3, log=print, fuse_kwargs=c.fuse_kwargs(),
                                 **c.tiny)
    return _bench_rows(rows)


def sec_bench_infer_eager(c: Check) -> dict:
    """The inference modes that need no compiling (a quick re-measure after a change)."""
    modes = ["eager_cl", "fused", "timm_eager", "timm_cl"] + ([] if c.dry else ["fused_graph"])
    rows = bench.bench_inference("poolformer_s12", modes, c.batch_infer, c.img, "bf16", str(c.device),
                                 repeats=3 if c.dry else 10, warmup=1 if c.dry else 3, log=print,
                                 fuse_kwargs=c.fuse_kwargs(), **c.tiny)
    return _bench_rows(rows)


# mixer tiles tried beside the default (the next round's data; the default stays until measured otherwise)
MIXER_SWEEP = ({"ROWS": 1}, {"ROWS": 4}, {"ROWS": 16}, {"num_warps": 8}, {"BLOCK_W": 8, "ROWS": 8})


def sec_kernels(c: Check) -> dict:
    """Each kernel at PoolFormer-S12's stage shapes (bf16, the inference batch), timed from CUDA-graph replays:
    achieved bandwidth counting the bytes it must move (each input read once, each output written once) as a
    share of the copy bandwidth measured in this run, and as a share of its roofline floor (the larger of
    bytes / copy bandwidth and FLOPs / the measured GEMM rate: the wider GEMMs are compute-bound). fc1 and fc2
    are timed for every candidate the tuning kept; ``chosen`` marks what the fused model runs. Each kernel's
    error against torch in float32 is checked at the same size."""
    from metaformer.fast import triton_ops as T
    from metaformer.fast import tuning

    ceil = c.results.get("ceilings", {})
    copy_bw = ceil.get("copy_GBps") or float("nan")
    gemm_rate = ceil.get("bf16_gemm_TFLOPs") or float("nan")
    dt = torch.bfloat16
    b = c.batch_infer
    out = {}
    g = torch.Generator(device=c.device).manual_seed(2)
    sizes = [(64, c.img // 4), (128, c.img // 8), (320, c.img // 16), (512, c.img // 32)]
    if c.dry:
        sizes = [(16, 16), (40, 7)]
    for ch, hw in sizes:
        x = torch.randn(b, ch, hw, hw, device=c.device, generator=g).to(dt).contiguous(memory_format=CL)
        t_bytes = x.numel() * 2
        gemm_flops = 2 * b * hw * hw * ch * 4 * ch
        scale = torch.rand(ch, device=c.device, generator=g)
        res = torch.rand(ch, device=c.device, generator=g)
        mu, rstd = T.gn1_stats(x, 1e-5)
        w1 = (torch.randn(4 * ch, ch, device=c.device, generator=g) / ch ** 0.5).to(dt)
        w2 = (torch.randn(ch, 4 * ch, device=c.device, generator=g) / (4 * ch) ** 0.5).to(dt)
        hid = torch.randn(b, 4 * ch, hw, hw, device=c.device, generator=g).to(dt).contiguous(memory_format=CL)
        n = T.standardise(x, mu, rstd)
        p1 = tuning.plan("fc1", ch, 4 * ch, dt, T.ACT_GELU, c.device, c.gemm_table)
        p2 = tuning.plan("fc2", 4 * ch, ch, dt, T.ACT_NONE, c.device, c.gemm_table)
        fc1_cands = {"triton default": ("triton", None)}
        if p1.impl == "triton" and p1.config:
            fc1_cands["triton tuned"] = ("triton", p1.config)
        if tuning.cublaslt_problem("fc1", dt, T.ACT_GELU) is None:
            fc1_cands["cublaslt"] = ("cublaslt", None)
        chosen1 = "cublaslt" if p1.impl == "cublaslt" else "triton tuned" if p1.config else "triton default"
        cases = {
            "gn1_stats": (lambda: T.gn1_stats(x, 1e-5), t_bytes, 0, True),
            "pool_mix": (lambda: T.pool_mix(x, mu, rstd, scale, None, res), 2 * t_bytes, 0, True),
            "mixer backward sums": (lambda: T.pool_mix_backward_sums(x, x, 3, True), 2 * t_bytes, 0, True),
            "mixer backward dx": (lambda: T.pool_mix_backward_dx(x, x, scale, rstd, res, mu, mu, 3), 3 * t_bytes,
                                  0, True),
            "standardise (cuBLASLt's prologue)": (lambda: T.standardise(x, mu, rstd), 2 * t_bytes, 0, False),
            "cuBLASLt GEMM + GELU alone": (lambda: torch._addmm_activation(torch.zeros(4 * ch, device=c.device,
                                           dtype=dt), n.permute(0, 2, 3, 1).reshape(-1, ch), w1.t(), use_gelu=True),
                                           5 * t_bytes, gemm_flops, False),
        }
        for label, (impl, cfg) in fc1_cands.items():
            cases[f"fc1 {label}"] = (lambda impl=impl, cfg=cfg: T.fc1(x, w1, None, mu, rstd, T.ACT_GELU, impl, cfg),
                                     5 * t_bytes, gemm_flops, label == chosen1)
        cases["fc2 triton default"] = (lambda: T.pointwise_conv(hid, w2, None, skip=x, res=res, stats=True),
                                       6 * t_bytes, gemm_flops, not p2.config)
        if p2.config:
            cases["fc2 triton tuned"] = (lambda: T.pointwise_conv(hid, w2, None, skip=x, res=res, stats=True,
                                                                  config=p2.config), 6 * t_bytes, gemm_flops, True)
        for name, (fn, nbytes, flops, chosen) in cases.items():
            try:
                t = timed_graph(fn, c.device)
            except Exception as e:  # noqa: BLE001 (one kernel's failure must not hide the others)
                out[f"{name} C={ch} {hw}x{hw}"] = {"error": f"{type(e).__name__}: {e}"[:300]}
                continue
            t_bytes_floor = nbytes / (copy_bw * 1e9)
            floor = max(t_bytes_floor, flops / (gemm_rate * 1e12))
            out[f"{name} C={ch} {hw}x{hw}"] = {
                "ms": t * 1e3, "GBps": nbytes / t / 1e9, "share_of_copy": nbytes / t / 1e9 / copy_bw,
                "floor_ms": floor * 1e3, "share_of_floor": floor / t, "chosen": chosen,
                # the share of copy bandwidth it would have at its roofline floor (below 1: compute-bound)
                "share_of_copy_at_floor": t_bytes_floor / floor}
        sweep = {}
        for cfg in MIXER_SWEEP[:2] if c.dry else MIXER_SWEEP:
            try:
                t = timed_graph(lambda cfg=cfg: T.pool_mix(x, mu, rstd, scale, None, res, config=cfg), c.device,
                                repeats=5)
                sweep[json.dumps(cfg)] = round(t * 1e3, 4)
            except Exception as e:  # noqa: BLE001 (a tile may not fit the hardware)
                sweep[json.dumps(cfg)] = type(e).__name__
        out[f"pool_mix tiles C={ch} {hw}x{hw} (ms; default {T.mixer_config(b, hw, hw, ch)})"] = sweep
        # correctness at this size, against torch in float32
        y, _ = T.pool_mix(x, mu, rstd, scale, None, res)
        xf = x.float()
        nf = F.group_norm(xf, 1, None, None, 1e-5)
        ref = res.view(1, -1, 1, 1) * xf + scale.view(1, -1, 1, 1) * (
            F.avg_pool2d(nf, 3, 1, 1, count_include_pad=False) - nf)
        out[f"pool_mix C={ch} {hw}x{hw}"]["rel_err"] = rel(y.float(), ref)
        ref = F.gelu(F.conv2d(nf.to(dt).float(), w1.float()[:, :, None, None]))
        for label, (impl, cfg) in fc1_cands.items():
            row = out.get(f"fc1 {label} C={ch} {hw}x{hw}")
            if row is not None and "error" not in row:
                row["rel_err"] = rel(T.fc1(x, w1, None, mu, rstd, T.ACT_GELU, impl, cfg).float(), ref)
    return out


def sec_families(c: Check) -> dict:
    """Forward and backward of one size per family in fp32, bf16 and fp16 (autocast, as training runs it),
    with and without the fast training path where it applies: finite, and close to fp32."""
    from metaformer.fast.training import enable_fast_training

    names = ["poolformer_s12", "metaformer_ppaa_s12", "poolformerv2_s12", "identityformer_s12", "randformer_s12",
             "convformer_s18", "caformer_s18"]
    out = {}
    x = torch.randn(4 if not c.dry else 2, 3, c.img, c.img, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([1, 2, 3, 4][:x.shape[0]])
    x, y = x.to(c.device), y.to(c.device)
    for name in names:
        for fast in (False, True):
            try:
                _family_rows(c, out, name, fast, x, y, enable_fast_training)
            except Exception as e:  # noqa: BLE001 (one family's failure must not hide the others)
                out[f"{name}{' fast' if fast else ''}"] = {"error": f"{type(e).__name__}: {e}"[:300], "finite": False}
    return out


def _family_rows(c: Check, out: dict, name: str, fast: bool, x, y, enable_fast_training) -> None:
    m = c.model(name, num_classes=10).train().to(c.device)
    if fast:
        enable_fast_training(m)
        if not any(getattr(b, "fast_training", False) for b in m.modules()):
            return  # no block of this family takes the fast path
    base = None
    for dtype in ("fp32", "bf16", "fp16"):
        m.zero_grad()
        amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype)
        torch.manual_seed(0)
        with torch.autocast(c.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = m(x)
            loss = F.cross_entropy(logits.float(), y)
        loss.backward()
        grad = torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]).float()
        row = {"loss": loss.item(), "finite": bool(torch.isfinite(logits).all() and torch.isfinite(grad).all())}
        if base is None:
            base = (logits.detach().float(), grad)
        else:
            row["logits_rel_vs_fp32"] = rel(logits.detach().float(), base[0])
            row["grad_cos_vs_fp32"] = F.cosine_similarity(grad, base[1], 0).item()
        out[f"{name}{' fast' if fast else ''}/{dtype}"] = row


def _bench_rows(rows) -> dict:
    return {r.mode: {"images_per_s": r.images_per_s, "min": r.images_per_s_min, "max": r.images_per_s_max,
                     "latency_ms": r.latency_ms, "peak_mem_mib": r.peak_mem_mib, "max_abs_diff": r.max_abs_diff,
                     "rel_diff": r.extra.get("rel_diff"), "note": r.note} for r in rows}


def sec_bench_train(c: Check) -> dict:
    """A training step (AdamW, bf16 autocast, batch 128): the fast path against timm eager, channels_last and
    ``torch.compile`` (default mode, as ``train --compile``), with each mode's allocator peak."""
    modes = ["eager_cl", "fast", "timm_eager", "timm_cl"] + (["timm_compile"] if c.compile else [])
    rows = bench.bench_training("poolformer_s12", modes, c.batch_train, c.img, str(c.device),
                                repeats=3 if c.dry else 6, warmup=1 if c.dry else 2, memory=not c.dry, log=print,
                                dtype="bf16", **c.tiny)
    return _bench_rows(rows)


def sec_bench_train_compile(c: Check) -> dict:
    """``torch.compile`` of the fast training path (its portable math, which inductor fuses) beside the fast
    path's Triton kernels and timm compiled: speed and peak memory."""
    if not c.compile:
        return {"skipped": "compiles only on the device"}
    rows = bench.bench_training("poolformer_s12", ["fast", "fast_compile", "timm_compile"], c.batch_train, c.img,
                                str(c.device), repeats=6, warmup=2, memory=True, log=print, dtype="bf16", **c.tiny)
    return _bench_rows(rows)


def sec_fuse(c: Check) -> dict:
    """Fused logits against the plain model (same dtype) and against float32, per pooling family, with the
    tuned GEMMs (``triton``), the default GEMMs (``triton-default-gemm``, when a table is in use) and the
    portable math (``aten``). float32 means IEEE float32: TF32 is off here (CUDA runs convolutions in TF32
    by default; the first H200 run compared our IEEE kernels with a TF32 plain model: 2-3e-4 apart)."""
    out = {}
    x32 = torch.randn(8 if not c.dry else 2, 3, c.img, c.img, generator=torch.Generator().manual_seed(1))
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        for name in ("poolformer_s12", "poolformerv2_s12", "identityformer_s12"):
            _fuse_compare(c, out, name, x32)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return out


def _fuse_compare(c: Check, out: dict, name: str, x32: torch.Tensor) -> None:
    variants = {"triton": {**c.fuse_kwargs(), "backend": "triton"}, "aten": {"backend": "aten"}}
    if c.gemm_table:
        variants["triton-default-gemm"] = dict(backend="triton")
    m = c.model(name).to(c.device)
    x = x32.to(c.device)
    with torch.no_grad():
        ref = m(x).float()
        for dtype in (torch.float32, torch.bfloat16):
            plain = m.to(dtype)(x.to(dtype)).float()
            for label, kw in variants.items():
                got = fuse(m, **kw)(x.to(dtype)).float()
                row = {"rel_vs_plain_same_dtype": rel(got, plain), "rel_vs_fp32": rel(got, ref),
                       "plain_rel_vs_fp32": rel(plain, ref),
                       "top1_agree_vs_plain": (got.argmax(1) == plain.argmax(1)).float().mean().item()}
                if dtype != torch.float32:  # the float32 plain model is the reference itself
                    row["fused_over_plain_vs_fp32"] = row["rel_vs_fp32"] / max(row["plain_rel_vs_fp32"], 1e-30)
                out[f"{name}/{str(dtype)[6:]}/{label}"] = row
            m.float()


def sec_graphs(c: Check) -> dict:
    """Each fused piece captured in a CUDA graph and replayed, against the same piece run eagerly
    (relative difference; NaN means the replay read memory nothing wrote)."""
    from metaformer.fast import triton_ops as T

    if c.device.type != "cuda":
        return {"skipped": "CUDA graphs need a GPU"}
    out = {}
    g = torch.Generator(device=c.device).manual_seed(5)
    x = torch.randn(8, 64, 56, 56, device=c.device, generator=g).to(torch.bfloat16).contiguous(memory_format=CL)
    scale = torch.rand(64, device=c.device, generator=g)
    w1 = (torch.randn(256, 64, device=c.device, generator=g) / 8).to(torch.bfloat16)
    m = c.model("poolformer_s12").to(c.device)
    xin = torch.randn(8, 3, c.img, c.img, device=c.device, generator=g).to(torch.bfloat16)
    f = fuse(m.to(torch.bfloat16), backend="triton")
    fa = fuse(m, backend="aten")
    blk = f.stages[0].blocks[0]

    def stats_mix(t):
        mu, rstd = T.gn1_stats(t, 1e-5)
        return T.pool_mix(t, mu, rstd, scale)[0]

    pieces = {
        "gn1_stats + pool_mix": (stats_mix, x),
        "pointwise_conv (fc1)": (lambda t: T.pointwise_conv(t, w1, None, act_out=T.ACT_GELU)[0], x),
        "one fused block": (lambda t: blk.forward_triton(t)[0], x),
        "fused model, triton": (f, xin),
        "fused model, aten": (fa, xin),
        "plain model": (m, xin),
    }
    with torch.no_grad():
        for name, (fn, inp) in pieces.items():
            try:
                ref = fn(inp).float().clone()
                got = bench.cuda_graph(fn, inp)(inp).float()
                out[name] = {"rel_graph_vs_eager": rel(got, ref), "nan": bool(got.isnan().any())}
            except Exception as e:  # noqa: BLE001
                out[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
    return out


def sec_pytest_triton(c: Check) -> dict:
    """The kernels' own tests (tests/test_triton.py), compiled for the device (8 workers where pytest-xdist is
    installed: the kernels' compiles run in parallel)."""
    import importlib.util

    repo = HERE.parent
    if c.dry or not (repo / "tests" / "test_triton.py").exists():
        return {"skipped": "runs in the test suite under TRITON_INTERPRET=1; here only on the device"}
    workers = ["-n", "8"] if importlib.util.find_spec("xdist") else []
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *workers,
                        "tests/test_triton.py"], cwd=repo, capture_output=True, text=True, timeout=c.left(400))
    return {"rc": p.returncode, "workers": workers[1:] or ["1"], "tail": (p.stdout + p.stderr).strip().splitlines()[-8:]}


def _train(c: Check, args: list[str], out: Path, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "metaformer", "train", "--output", str(out), "--overwrite", "--workers", "0",
           "--json", *args]
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())
    row = {"cmd": " ".join(cmd[2:]), "rc": p.returncode, "wall_s": round(time.time() - t0, 1)}
    if p.returncode != 0:
        row["error"] = (p.stderr or p.stdout).strip().splitlines()[-3:]
        return row
    import csv

    with open(out / "metrics.csv") as f:
        hist = list(csv.DictReader(f))
    row["train_loss"] = [round(float(h["train_loss"]), 4) for h in hist]
    row["val_top1"] = [round(float(h["val_top1"]), 2) for h in hist]
    return row


def scratch(prefix: str) -> Path:
    """A scratch folder for a section's runs, removed when the check exits (the report lives in --out)."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    return tmp


def sec_train_digits(c: Check) -> dict:
    """``metaformer train`` on the built-in digits (the demo's model): ~200 optimizer steps on the GPU with
    channels_last, in bf16 with the fast path on and off and with ``--compile``, and in fp16 with its
    GradScaler, against the same steps on the CPU in float32 (1,437 images / 64 per step = 23 steps per epoch)."""
    # the dry run: one epoch of a smaller model, to keep the test suite quick
    size = ["--epochs", "1", "--depths", "1", "1", "1", "1", "--dims", "8", "16", "24", "32"] if c.dry else ["--epochs", "9"]
    tmp = scratch("gpu-check-train-")
    out = {"cpu fp32": _train(c, ["--device", "cpu", "--amp", "none", *size], tmp / "cpu", c.left(600))}
    configs = {"bf16 fast": ["--amp", "bf16", "--fast-training"], "fp16 fast": ["--amp", "fp16", "--fast-training"]}
    if not c.dry:
        configs = {"bf16 plain": ["--amp", "bf16"], **configs, "bf16 compile": ["--amp", "bf16", "--compile"],
                   "bf16 fast+compile": ["--amp", "bf16", "--fast-training", "--compile"]}
    dev = ["--device", c.device.type, "--channels-last"]
    for name, extra in configs.items():
        out[f"gpu {name}"] = _train(c, [*dev, *extra, *size], tmp / name.replace(" ", "_").replace("+", "_"),
                                    c.left(300))
    cpu = out["cpu fp32"]
    for name, row in out.items():
        if name != "cpu fp32" and "train_loss" in row and "train_loss" in cpu:
            row["final_loss_minus_cpu"] = round(row["train_loss"][-1] - cpu["train_loss"][-1], 4)
            row["final_top1_minus_cpu"] = round(row["val_top1"][-1] - cpu["val_top1"][-1], 2)
    return out


def sec_ddp(c: Check) -> dict:
    """DistributedDataParallel over NCCL (gloo in the dry run) with one process: the plain and the fast training
    path, wrapped, take the same AdamW steps as unwrapped (bf16 autocast), and DDP raises no warning (a
    gradient whose strides differ from its parameter's costs DDP a copy per step and a warning)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from metaformer.fast.training import enable_fast_training

    store = dist.FileStore(str(scratch("gpu-check-ddp-") / "store"), 1)
    dist.init_process_group("gloo" if c.dry else "nccl", store=store, rank=0, world_size=1)
    out = {"backend": dist.get_backend()}
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4 if not c.dry else 2, 3, c.img, c.img, generator=g).to(c.device)
    y = torch.randint(0, 10, (x.shape[0],), generator=g).to(c.device)
    try:
        for fast in (False, True):
            m = c.model("poolformer_s12", num_classes=10, drop_path_rate=0.0).train().to(c.device)
            if fast:
                enable_fast_training(m)
            nets = {"single": copy.deepcopy(m)}
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                nets["ddp"] = DDP(m, device_ids=[0] if c.device.type == "cuda" else None)
                losses = {}
                for label, net in nets.items():
                    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
                    losses[label] = []
                    for _ in range(3):
                        opt.zero_grad(set_to_none=True)
                        with torch.autocast(c.device.type, dtype=torch.bfloat16):
                            loss = F.cross_entropy(net(x).float(), y)
                        loss.backward()
                        opt.step()
                        losses[label].append(round(loss.item(), 6))
            single = torch.cat([p.detach().flatten() for p in nets["single"].parameters()])
            wrapped = torch.cat([p.detach().flatten() for p in nets["ddp"].module.parameters()])
            out["fast" if fast else "plain"] = {"losses": losses, "params_rel_diff": rel(wrapped, single),
                                                "warnings": sorted({str(w.message)[:200] for w in caught})}
    finally:
        dist.destroy_process_group()
    return out


def sec_export(c: Check) -> dict:
    """Export from a model that lives on the GPU: torch.export run on CUDA, and our verified ONNX and
    torch.export files (written from it, checked in their own runtime)."""
    from metaformer.tools.export import export

    out = {}
    m = c.model("poolformer_s12").to(c.device)
    x = torch.randn(2, 3, c.img, c.img, device=c.device)
    with torch.no_grad():
        ref = m(x)
        # exporting, the Triton-fused model runs its portable math (the kernels are opaque to tracing)
        for label, model in (("plain", m), ("fused", fuse(m, backend="triton"))):
            try:
                ep = torch.export.export(model, (x,))
                out[f"torch.export on {c.device.type} ({label})"] = {"rel": rel(ep.module()(x), ref)}
            except Exception as e:  # noqa: BLE001 (recorded, the section goes on)
                out[f"torch.export on {c.device.type} ({label})"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    tmp = scratch("gpu-check-export-")
    for fmt in ("onnx", "exported"):
        try:
            r = export(m, tmp / f"s12.{fmt}", fmt)
            out[f"metaformer export {fmt} from a {c.device.type} model"] = {"max_diff": r.max_diff_random, "ok": r.ok}
        except Exception as e:  # noqa: BLE001
            out[f"metaformer export {fmt} from a {c.device.type} model"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    return out


def sec_dense(c: Check) -> dict:
    """A few iterations of toy Mask R-CNN and Semantic FPN through the CLI on the device."""
    tmp = scratch("gpu-check-dense-")
    dev = "cpu" if c.dry else "cuda"
    mf = [sys.executable, "-m", "metaformer"]
    small = ["--override", "depths=[1,1,1,1]", "--override", "dims=[16,32,48,64]", "--fpn-channels", "64"]
    runs = {
        "make-toy-data": [*mf, "detect", "make-toy-data", str(tmp / "toy"), "--num-train", "8", "--num-val", "4"],
        "detect train (mask_rcnn)": [
            *mf, "detect", "train", "--arch", "mask_rcnn", "--train-images", str(tmp / "toy/images/training"),
            "--train-ann", str(tmp / "toy/instances_training.json"), "--val-images", str(tmp / "toy/images/validation"),
            "--val-ann", str(tmp / "toy/instances_validation.json"), "--output", str(tmp / "det"), *small,
            "--detector-opt", "box_head_dim=128", "--detector-opt", "mask_head_channels=32", "--min-size", "128",
            "--max-size", "128", "--epochs", "1", "--batch-size", "4", "--workers", "0", "--device", dev],
        "segment train (semantic FPN)": [
            *mf, "segment", "train", "--data-root", str(tmp / "toy"), "--num-classes", "4", "--output",
            str(tmp / "seg"), *small, "--img-scale", "256", "128", "--crop-size", "128", "--iters", "10",
            "--batch-size", "4", "--eval-every", "10", "--ckpt-every", "10", "--workers", "0", "--device", dev],
    }
    out = {}
    for name, cmd in runs.items():
        t0 = time.time()
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        out[name] = {"rc": p.returncode, "wall_s": round(time.time() - t0, 1),
                     "tail": (p.stdout + p.stderr).strip().splitlines()[-2:]}
    return out


def sec_inductor_traffic(c: Check) -> dict:
    """What inductor's generated kernels declare they move for one PoolFormer block (timm's, stage 1 shape,
    max-autotune), read from its code (``kernel_num_gb``), beside our count for the plain and fused block."""
    import re

    import timm
    from torch._inductor.utils import run_and_get_code

    ch, hw = 64, c.img // 4
    blk = timm.create_model("poolformer_s12").stages[0].blocks[0].to(c.device, torch.bfloat16).eval()
    blk = blk.to(memory_format=CL)
    x = torch.randn(c.batch_infer, ch, hw, hw, device=c.device).to(torch.bfloat16).contiguous(memory_format=CL)
    t_bytes = x.numel() * 2
    out = {"map_MB": t_bytes / 1e6, "plain_maps": sum(traffic.PLAIN_BLOCK.values()),
           "ours_maps": sum(traffic.OURS_BLOCK.values())}
    if not c.compile:
        out["inductor"] = "compiles only on the device"
        return out
    options = {**bench.compile_options(c.device), "benchmark_kernel": True}
    compiled = torch.compile(blk, options=options)
    with torch.no_grad():
        _, code = run_and_get_code(compiled, x)
    text = "\n".join(code)
    gbs = [float(v) for v in re.findall(r"kernel_num_gb['\"]?:\s*([0-9.eE+-]+)", text)]
    out.update(triton_kernels=len(gbs), triton_kernel_GB=sum(gbs),
               extern_calls=len(re.findall(r"extern_kernels\.\w+\(", text)))
    out["inductor_maps_triton_only"] = sum(gbs) * 1e9 / t_bytes
    (c.out / "inductor_block.py.txt").write_text(text[:4_000_000])
    return out


# priority order: what the targets need first (the GEMM table feeds the inference benchmark), then what has
# never run on CUDA, then the rest
SECTIONS = {
    "env": sec_env, "ceilings": sec_ceilings, "gemm_tune": sec_gemm_tune, "bench_infer": sec_bench_infer,
    "kernels": sec_kernels, "bench_train": sec_bench_train, "fuse": sec_fuse, "pytest_triton": sec_pytest_triton,
    "bench_train_compile": sec_bench_train_compile, "train_digits": sec_train_digits, "ddp": sec_ddp,
    "families": sec_families, "graphs": sec_graphs, "export": sec_export, "dense": sec_dense,
    "bench_infer_ours_compiled": sec_bench_infer_ours_compiled, "bench_infer_eager": sec_bench_infer_eager,
    "inductor_traffic": sec_inductor_traffic,
}
# Device seconds per section on a cold start (most of it compiling), for the budget. bench_infer: timm's
# max-autotune compile took about three minutes on the H200 (384 s for two such compiles in the first run);
# with --inductor-cache holding it, a fraction of that (COST_CACHED).
COST = {"ceilings": 10, "gemm_tune": 75, "bench_infer": 230, "kernels": 40, "bench_train": 120, "fuse": 30,
        "pytest_triton": 120, "bench_train_compile": 150, "train_digits": 300, "ddp": 20, "families": 20,
        "graphs": 15, "export": 30, "dense": 40, "bench_infer_ours_compiled": 230, "bench_infer_eager": 15,
        "inductor_traffic": 40}
COST_CACHED = {"gemm_tune": 20, "bench_infer": 50, "bench_train": 60, "pytest_triton": 60, "bench_train_compile": 60,
               "train_digits": 150, "bench_infer_ours_compiled": 50, "inductor_traffic": 15}
# after these (inductor's long compiles) the caches are written at once, so a run stopped later keeps them;
# after the last section they are written again with everything else compiled (our own Triton kernels)
SAVE_CACHE_AFTER = {"bench_infer", "bench_train", "bench_train_compile", "train_digits", "bench_infer_ours_compiled"}


def run_sections(c: Check, names: list[str], budget: float | None, sections: dict | None = None,
                 cost: dict | None = None) -> None:
    """Run ``names`` in order, saving after each. Under ``budget`` seconds a section whose usual cost no longer
    fits is skipped, and a section still running when the budget is spent is stopped (SIGALRM) and recorded as
    such; the sections after it are skipped."""
    sections = sections or SECTIONS
    cost = cost or COST
    t_start = time.time()
    c.deadline = None if budget is None else t_start + budget

    def spent(signum, frame):
        raise BudgetSpent()

    if budget is not None:
        signal.signal(signal.SIGALRM, spent)
        signal.setitimer(signal.ITIMER_REAL, budget)
    name = None
    try:
        for i, name in enumerate(names):
            left = None if budget is None else budget - (time.time() - t_start)
            # a skipped section keeps what an earlier run (--only, same --out) measured
            if left is not None and left < cost.get(name, 20):
                c.results.setdefault(name, {"error": f"skipped: {left:.0f}s of the budget left, the section "
                                                     f"needs ~{cost.get(name, 20)}s"})
                print(f"[gpu_check] {name}: skipped (budget)", flush=True)
                c.save()
                continue
            t0 = time.time()
            print(f"[gpu_check] {name} ...", flush=True)
            try:
                c.results[name] = sections[name](c)
            except BudgetSpent:
                c.results[name] = {"error": f"stopped: the budget of {budget:.0f}s ran out after "
                                            f"{time.time() - t0:.0f}s in this section"}
                for rest in names[i + 1:]:
                    c.results.setdefault(rest, {"error": "skipped: the budget ran out"})
                print(f"[gpu_check] {name}: stopped (budget)", flush=True)
                c.save()
                break
            except Exception as e:  # noqa: BLE001 (every section reports; one failure must not hide the rest)
                c.results[name] = {"error": f"{type(e).__name__}: {e}"[:500],
                                   "traceback": traceback.format_exc().splitlines()[-12:]}
            if c.device.type == "cuda":
                torch.cuda.empty_cache()
            print(f"[gpu_check] {name}: {time.time() - t0:.0f}s", flush=True)
            if c.cache is not None and name in SAVE_CACHE_AFTER:
                c.results.setdefault("cache", {})["saved"] = save_cache(c.cache, c.out / "inductor_cache.tar.gz")
            c.save()
    except BudgetSpent:  # spent between sections (saving the caches): what ran is kept, the rest skipped
        for rest in names[names.index(name) + 1:] if name in names else []:
            c.results.setdefault(rest, {"error": "skipped: the budget ran out"})
    finally:
        if budget is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
    c.results.setdefault("run", {})["seconds"] = round(time.time() - t_start, 1)
    if c.cache is not None:
        c.results.setdefault("cache", {})["saved"] = save_cache(c.cache, c.out / "inductor_cache.tar.gz")
    c.save()


# ----------------------------------------------------------------------------- report
def _ratio(rows: dict, a: str, b: str, key: str = "images_per_s") -> float | None:
    try:
        va, vb = rows[a][key], rows[b][key]
    except (KeyError, TypeError):
        return None
    if va is None or vb is None or not math.isfinite(va) or not math.isfinite(vb) or vb == 0:
        return None
    return va / vb


def targets(results: dict) -> list[tuple[str, float | None, float, str]]:
    """(target, measured, bar, how it was measured)."""
    rows = []
    inf, tr = results.get("bench_infer", {}), results.get("bench_train", {})

    def checked(rows: dict, mode: str) -> float:  # a mode counts only if its logits were checked and finite
        r = rows.get(mode) or {}
        ok = r.get("rel_diff") is not None and math.isfinite(r["rel_diff"])
        return r.get("images_per_s") or 0 if ok else 0

    best = max(("fused", "fused_graph"), key=lambda m: checked(inf, m))
    for key, ref in (("infer: fused / timm_eager (bf16 b256)", "timm_eager"),
                     ("infer: fused / timm_compile max-autotune (bf16 b256)", "timm_compile")):
        rows.append((key, _ratio(inf, best, ref), TARGETS[key], f"{best} / {ref}"))
    kern = {k: v for k, v in results.get("kernels", {}).items() if isinstance(v, dict) and v.get("chosen")
            and math.isfinite(v.get("share_of_copy", float("nan")))}
    worst = min(kern, key=lambda k: kern[k]["share_of_copy"], default=None)
    how = "the kernels the fused model runs"
    if worst:
        how = f"{worst}; {kern[worst]['share_of_copy_at_floor']:.2f} at its roofline floor"
    rows.append(("kernels: share of copy bandwidth (worst)", kern[worst]["share_of_copy"] if worst else None,
                 TARGETS["kernels: share of copy bandwidth (worst)"], how))
    key = "train: fast / timm_eager (bf16 b128)"
    rows.append((key, _ratio(tr, "fast", "timm_eager"), TARGETS[key], "fast / timm_eager"))
    key = "train: fast / timm_compile (bf16 b128)"
    rows.append((key, _ratio(tr, "fast", "timm_compile"), TARGETS[key], "fast / timm_compile (default mode)"))
    for ref in ("timm_eager", "timm_compile"):
        key = f"train: peak memory fast / {ref}"
        rows.append((key, _ratio(tr, "fast", ref, "peak_mem_mib"), TARGETS[key], "allocator peak during a step"))
    fz = results.get("fuse", {})
    vals = [v["fused_over_plain_vs_fp32"] for k, v in fz.items() if k.endswith("/bfloat16/triton")]
    key = "fused bf16: rel. diff to fp32 / plain bf16's"
    rows.append((key, max(vals) if vals else None, TARGETS[key], "worst family, tuned GEMMs"))
    vals = [v["rel_vs_plain_same_dtype"] for k, v in fz.items() if k.endswith("/float32/triton")]
    key = "fused fp32 (TF32 off): rel. diff to plain"
    rows.append((key, max(vals) if vals else None, TARGETS[key], "worst family"))
    return rows


def _met(name: str, value: float | None, bar: float) -> str:
    if value is None:
        return "not measured"
    lower_is_better = "memory" in name or "diff" in name
    return "met" if (value <= bar if lower_is_better else value >= bar) else "NOT met"


def report(results: dict) -> str:
    env = results.get("env", {})
    lines = ["# GPU check", "", f"{env.get('cuda') or 'CPU (dry run)'}; driver {env.get('driver')}; torch "
             f"{env.get('torch')}, CUDA {env.get('cuda_runtime')}, triton {env.get('triton')}, timm {env.get('timm')}; "
             f"{env.get('time')}", "", "## Targets", "", "| target | measured | bar | | how |", "|---|---:|---:|---|---|"]
    for name, value, bar, how in targets(results):
        v = "-" if value is None else f"{value:.3g}"
        lines.append(f"| {name} | {v} | {bar:g} | {_met(name, value, bar)} | {how} |")
    ceil = results.get("ceilings", {})
    if ceil and "copy_GBps" in ceil:
        lines += ["", f"Ceilings: copy {ceil.get('copy_GBps', 0):.0f} GB/s (torch {ceil.get('torch_copy_GBps', 0):.0f}, "
                  f"Triton {ceil.get('triton_copy_GBps', 0):.0f}), bf16 GEMM {ceil.get('bf16_gemm_TFLOPs', 0):.0f} TFLOP/s"]
        pred = traffic.predictions(224, ceil.get("copy_GBps", 4300) * 1e9)
        lines.append("Traffic model at that bandwidth (S12 224 bf16): " + ", ".join(
            f"{k} {v['mb_per_image']:.1f} MB/image -> {v['images_per_s']:.0f} images/s" for k, v in pred.items()))
    for sec in ("bench_infer", "bench_train", "bench_train_compile", "bench_infer_ours_compiled", "bench_infer_eager"):
        rows = results.get(sec)
        if isinstance(rows, dict) and rows and "error" not in rows and "skipped" not in rows:
            lines += ["", f"## {sec}", "", "| mode | images/s | min-max | latency ms | peak MiB | rel diff | note |",
                      "|---|---:|---|---:|---:|---:|---|"]
            for mode, r in rows.items():
                if r.get("images_per_s") is None:
                    lines.append(f"| {mode} | - | - | - | - | - | {r.get('note', '')} |")
                    continue
                mem = "" if r.get("peak_mem_mib") is None else f"{r['peak_mem_mib']:.0f}"
                rd = "" if r.get("rel_diff") is None else f"{r['rel_diff']:.2e}"
                lines.append(f"| {mode} | {r['images_per_s']:.0f} | {r['min']:.0f}-{r['max']:.0f} | "
                             f"{r['latency_ms']:.2f} | {mem} | {rd} | {r.get('note', '')} |")
    kern = results.get("kernels", {})
    if isinstance(kern, dict) and any(isinstance(v, dict) and "ms" in v for v in kern.values()):
        lines += ["", "## kernels", "", "| kernel | ms | GB/s | share of copy | share of floor | chosen | rel err |",
                  "|---|---:|---:|---:|---:|---|---:|"]
        for name, v in kern.items():
            if isinstance(v, dict) and "ms" in v and "share_of_copy" in v:
                err = "" if v.get("rel_err") is None else f"{v['rel_err']:.1e}"
                lines.append(f"| {name} | {v['ms']:.4f} | {v['GBps']:.0f} | {v['share_of_copy']:.2f} | "
                             f"{v['share_of_floor']:.2f} | {'yes' if v.get('chosen') else ''} | {err} |")
    for sec in ("gemm_tune", "graphs", "kernels", "fuse", "pytest_triton", "train_digits", "ddp", "families", "export",
                "dense", "inductor_traffic", "cache", "run"):
        if sec in results:
            lines += ["", f"## {sec}" + (" (all rows)" if sec == "kernels" else ""), "", "```",
                      json.dumps(results[sec], indent=1, default=str)[:20000], "```"]
    errors = {k: v for k, v in results.items() if isinstance(v, dict) and "error" in v}
    if errors:
        lines += ["", "## Errors and skipped sections", ""] + [f"- {k}: {v['error']}" for k, v in errors.items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for gpu_check.json / gpu_check.md (and the caches' archive)")
    ap.add_argument("--dry-run", action="store_true", help="the same code on the CPU at tiny sizes (Triton interpreted)")
    ap.add_argument("--only", help="comma-separated sections (default: all, in this order): " + ",".join(SECTIONS))
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for all sections: one that would not fit is skipped, one running when it is "
                         "spent is stopped (default: no limit)")
    ap.add_argument("--inductor-cache", type=Path, default=None, metavar="FILE.tar.gz",
                    help="compile caches from an earlier run (read if it exists); this run's are written to "
                         "OUT/inductor_cache.tar.gz")
    ap.add_argument("--gemm-table", type=Path, default=None, metavar="FILE.json",
                    help="a GEMM table from an earlier run (its gemm_table.json) instead of tuning again")
    args = ap.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; use --dry-run on a CPU", file=sys.stderr)
        return 2
    names = args.only.split(",") if args.only else list(SECTIONS)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        print(f"gpu_check: unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    if args.budget is not None and args.budget <= 0:
        print("gpu_check: --budget must be a positive number of seconds", file=sys.stderr)
        return 2
    c = Check(args.dry_run, Path(args.out))
    prev = Path(args.out) / "gpu_check.json"
    if args.only and prev.exists():  # a partial rerun adds to the last report
        c.results = json.loads(prev.read_text())
    if args.gemm_table is not None:
        from metaformer.fast import tuning

        c.gemm_table = tuning.load_table(args.gemm_table)
    elif (Path(args.out) / "gemm_table.json").exists() and args.only and "gemm_tune" not in names:
        from metaformer.fast import tuning

        c.gemm_table = tuning.load_table(Path(args.out) / "gemm_table.json")
    cost = COST
    if args.inductor_cache is not None:
        c.results["cache"] = {"read": use_cache(c, args.inductor_cache)}
        if c.results["cache"]["read"].get("read"):
            cost = {**COST, **COST_CACHED}
    if "env" not in names:
        c.results["env"] = sec_env(c)
    run_sections(c, names, args.budget, cost=cost)
    print(report({k: c.results[k] for k in ("env", "ceilings", "bench_infer", "bench_train") if k in c.results}
                 | {k: v for k, v in c.results.items() if k in ("fuse", "kernels")}).split("## bench_infer")[0])
    errors = [k for k, v in c.results.items() if isinstance(v, dict) and "error" in v]
    print(f"[gpu_check] done in {c.results['run']['seconds']:.0f}s; sections with errors or skipped: {errors or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
