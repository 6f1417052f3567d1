"""Every GPU check and measurement in one run: correctness of each path on CUDA, the Triton kernels'
bandwidth against a copy, the benchmark targets against timm, training on the digits, export and the
dense tasks. Writes ``gpu_check.json`` and ``gpu_check.md`` to ``--out`` after every section (a run
cut short keeps what it measured) and prints the summary table last.

    python benchmarks/gpu_check.py --out DIR              # on a CUDA machine (~6-8 min on an H200)
    python benchmarks/gpu_check.py --out DIR --dry-run    # the same code on the CPU at tiny sizes
    python benchmarks/gpu_check.py --out DIR --only bench_infer,bench_train

It installs nothing: run it where torch (and, for the kernels, Triton) is installed, with this
checkout on ``PYTHONPATH`` (``PYTHONPATH=src``) or our wheel installed (``benchmarks/README.md``).
Sections run in priority order under ``--budget`` seconds; what does not fit is marked skipped.
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
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
TARGETS = {  # from the GPU issue: ratio >= value, or <= for memory and logit differences
    "infer: fused / timm_eager (bf16 b256)": 2.0,
    "infer: fused / timm_compile max-autotune (bf16 b256)": 1.3,
    "kernels: share of copy bandwidth": 0.6,
    "train: fast / timm_eager (bf16 b128)": 1.5,
    "train: fast / timm_compile (bf16 b128)": 1.1,
    "train: peak memory fast / timm_eager": 0.7,
    "fused logits rel. diff bf16": 1e-3,
    "fused logits rel. diff fp32": 1e-5,
}


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
        self.full = False  # also the compiled variants whose compiles cost minutes (--full)
        self.results: dict = {}

    def model(self, name: str, **kw):
        torch.manual_seed(0)
        m = metaformer.create_model(name, img_size=self.img, **{**self.tiny, **kw}).eval()
        bench._randomize_affine(m)
        return m

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "gpu_check.json").write_text(json.dumps(self.results, indent=1, default=str))
        (self.out / "gpu_check.md").write_text(report(self.results))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def timed(fn, device: torch.device, repeats: int = 20, warmup: int = 3) -> float:
    """Median seconds per call (device events on CUDA)."""
    timer = bench.make_timer(device)
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        timer.start()
        fn()
        ts.append(timer.stop())
    ts.sort()
    return ts[len(ts) // 2]


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


def sec_fuse(c: Check) -> dict:
    """Fused logits against the plain model (same dtype) and against fp32, per pooling family."""
    out = {}
    x32 = torch.randn(8 if not c.dry else 2, 3, c.img, c.img, generator=torch.Generator().manual_seed(1))
    backends = ["triton", "aten"]
    # float32 means IEEE float32 here: CUDA runs convolutions in TF32 by default (the first H200 run
    # compared our IEEE kernels with a TF32 plain model: 2-3e-4 apart)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        _fuse_compare(c, out, x32, backends)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return out


def _fuse_compare(c: Check, out: dict, x32: torch.Tensor, backends: list[str]) -> None:
    for name in ("poolformer_s12", "poolformerv2_s12", "identityformer_s12"):
        m = c.model(name).to(c.device)
        x = x32.to(c.device)
        with torch.no_grad():
            ref = m(x).float()
            for dtype in (torch.float32, torch.bfloat16):
                plain = m.to(dtype)(x.to(dtype)).float()
                for backend in backends:
                    f = fuse(m, backend=backend)
                    got = f(x.to(dtype)).float()
                    key = f"{name}/{str(dtype)[6:]}/{backend}"
                    out[key] = {"rel_vs_plain_same_dtype": rel(got, plain), "rel_vs_fp32": rel(got, ref),
                                "plain_rel_vs_fp32": rel(plain, ref),
                                "top1_agree_vs_plain": (got.argmax(1) == plain.argmax(1)).float().mean().item()}
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


def sec_kernels(c: Check) -> dict:
    """Each kernel at PoolFormer-S12's stage shapes (bf16, the inference batch): achieved bandwidth,
    counting the bytes it must move (each input read once, each output written once), as a share of
    the copy bandwidth measured in this run; and its error against torch."""
    from metaformer.fast import triton_ops as T

    copy_bw = c.results.get("ceilings", {}).get("copy_GBps") or float("nan")
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
        scale = torch.rand(ch, device=c.device, generator=g)
        res = torch.rand(ch, device=c.device, generator=g)
        mu, rstd = T.gn1_stats(x, 1e-5)
        w1 = (torch.randn(4 * ch, ch, device=c.device, generator=g) / ch ** 0.5).to(dt)
        w2 = (torch.randn(ch, 4 * ch, device=c.device, generator=g) / (4 * ch) ** 0.5).to(dt)
        hid = torch.randn(b, 4 * ch, hw, hw, device=c.device, generator=g).to(dt).contiguous(memory_format=CL)
        cases = {
            "gn1_stats": (lambda: T.gn1_stats(x, 1e-5), t_bytes),
            "pool_mix": (lambda: T.pool_mix(x, mu, rstd, scale, None, res), 2 * t_bytes),
            "fc1 (norm, GELU)": (lambda: T.pointwise_conv(x, w1, None, norm=(mu, rstd), act_out=T.ACT_GELU),
                                 5 * t_bytes),
            "fc2 (residual, stats)": (lambda: T.pointwise_conv(hid, w2, None, skip=x, res=res, stats=True),
                                      6 * t_bytes),
            "mixer backward sums": (lambda: T.pool_mix_backward_sums(x, x, 3, True), 2 * t_bytes),
            "mixer backward dx": (lambda: T.pool_mix_backward_dx(x, x, scale, rstd, res, mu, mu, 3), 3 * t_bytes),
        }
        for name, (fn, nbytes) in cases.items():
            t = timed_graph(fn, c.device)
            t_launch = timed(fn, c.device, repeats=2 if c.dry else 20, warmup=1 if c.dry else 3)
            out[f"{name} C={ch} {hw}x{hw}"] = {"ms": t * 1e3, "ms_with_launch": t_launch * 1e3,
                                               "GBps": nbytes / t / 1e9, "share_of_copy": nbytes / t / 1e9 / copy_bw}
        if ch in (64, 320, 16):  # fc1's tile sizes, and what its GELU epilogue costs
            sweep = {}
            for cfg in ({}, {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4}, {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4},
                        {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 4},
                        {"BLOCK_M": 128, "BLOCK_N": 256, "num_warps": 8}, {"BLOCK_M": 256, "BLOCK_N": 128, "num_warps": 8}):
                for act in (T.ACT_GELU, T.ACT_NONE):
                    try:
                        t = timed_graph(lambda: T.pointwise_conv(x, w1, None, norm=(mu, rstd), act_out=act, config=cfg),
                                        c.device, repeats=5)
                        sweep[f"{cfg or 'default'} act={act}"] = round(t * 1e3, 4)
                    except Exception as e:  # noqa: BLE001 (a config may not fit the hardware)
                        sweep[f"{cfg or 'default'} act={act}"] = f"{type(e).__name__}"
            out[f"fc1 sweep C={ch} {hw}x{hw} (ms)"] = sweep
        # correctness at this size, against torch in float32
        y, _ = T.pool_mix(x, mu, rstd, scale, None, res)
        xf = x.float()
        n = F.group_norm(xf, 1, None, None, 1e-5)
        ref = res.view(1, -1, 1, 1) * xf + scale.view(1, -1, 1, 1) * (F.avg_pool2d(n, 3, 1, 1, count_include_pad=False) - n)
        out[f"pool_mix C={ch} {hw}x{hw}"]["rel_err"] = rel(y.float(), ref)
        h, _ = T.pointwise_conv(x, w1, None, norm=(mu, rstd), act_out=T.ACT_GELU)
        ref = F.gelu(F.conv2d(n.to(dt).float(), w1.float()[:, :, None, None]))
        out[f"fc1 (norm, GELU) C={ch} {hw}x{hw}"]["rel_err"] = rel(h.float(), ref)
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


def sec_bench_infer(c: Check) -> dict:
    modes = ["eager", "eager_cl", "fused", "fused_graph", "timm_eager", "timm_cl"]
    if c.compile:
        modes += ["fused_compile", "timm_compile"]
    if c.dry:
        modes.remove("fused_graph")
    rows = bench.bench_inference("poolformer_s12", modes, c.batch_infer, c.img, "bf16", str(c.device),
                                 repeats=3 if c.dry else 10, warmup=1 if c.dry else 3, log=print, **c.tiny)
    return _bench_rows(rows)


def sec_bench_infer_eager(c: Check) -> dict:
    """The inference modes that need no compiling (a quick re-measure after a change)."""
    modes = ["eager_cl", "fused", "timm_eager", "timm_cl"] + ([] if c.dry else ["fused_graph"])
    rows = bench.bench_inference("poolformer_s12", modes, c.batch_infer, c.img, "bf16", str(c.device),
                                 repeats=3 if c.dry else 10, warmup=1 if c.dry else 3, log=print, **c.tiny)
    return _bench_rows(rows)


def sec_bench_train(c: Check) -> dict:
    modes = ["eager_cl", "fast", "timm_eager", "timm_cl"]
    if c.compile:
        modes += ["timm_compile"] + (["fast_compile"] if c.full else [])
    rows = bench.bench_training("poolformer_s12", modes, c.batch_train, c.img, str(c.device),
                                repeats=3 if c.dry else 6, warmup=1 if c.dry else 2, memory=not c.dry, log=print,
                                dtype="bf16", **c.tiny)
    return _bench_rows(rows)


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
    """``metaformer train`` on the built-in digits (the demo's model): ~200 optimizer steps on the GPU in
    bf16 with channels_last, with compile and the fast path on and off, against the same steps on the
    CPU in fp32 (1,437 images / 64 per step = 23 steps per epoch)."""
    # the dry run: one epoch of a smaller model, to keep the test suite quick
    size = ["--epochs", "1", "--depths", "1", "1", "1", "1", "--dims", "8", "16", "24", "32"] if c.dry else ["--epochs", "9"]
    tmp = scratch("gpu-check-train-")
    out = {"cpu fp32": _train(c, ["--device", "cpu", "--amp", "none", *size], tmp / "cpu", 600)}
    if c.dry:
        configs = {"fast": ["--fast-training"]}
        dev = ["--device", "cpu", "--amp", "bf16", "--channels-last"]
    else:
        configs = {"plain": [], "fast": ["--fast-training"]}
        if c.full:
            configs.update({"compile": ["--compile"], "fast+compile": ["--fast-training", "--compile"]})
        dev = ["--device", "cuda", "--amp", "bf16", "--channels-last"]
    for name, extra in configs.items():
        out[f"gpu bf16 {name}"] = _train(c, [*dev, *extra, *size], tmp / name.replace("+", "_"), 300)
    cpu = out["cpu fp32"]
    for name, row in out.items():
        if name != "cpu fp32" and "train_loss" in row and "train_loss" in cpu:
            row["final_loss_minus_cpu"] = round(row["train_loss"][-1] - cpu["train_loss"][-1], 4)
            row["final_top1_minus_cpu"] = round(row["val_top1"][-1] - cpu["val_top1"][-1], 2)
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


def sec_pytest_triton(c: Check) -> dict:
    """The kernels' own tests (tests/test_triton.py), compiled for the device."""
    repo = HERE.parent
    if c.dry or not (repo / "tests" / "test_triton.py").exists():
        return {"skipped": "runs in the test suite under TRITON_INTERPRET=1; here only on the device"}
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/test_triton.py"],
                       cwd=repo, capture_output=True, text=True, timeout=300)
    return {"rc": p.returncode, "tail": (p.stdout + p.stderr).strip().splitlines()[-6:]}


SECTIONS = {  # priority order: what the targets need first
    "env": sec_env, "ceilings": sec_ceilings, "fuse": sec_fuse, "kernels": sec_kernels, "graphs": sec_graphs,
    "bench_infer": sec_bench_infer, "bench_train": sec_bench_train, "families": sec_families,
    "train_digits": sec_train_digits, "export": sec_export, "dense": sec_dense,
    "bench_infer_eager": sec_bench_infer_eager, "inductor_traffic": sec_inductor_traffic,
    "pytest_triton": sec_pytest_triton,
}
# rough device seconds per section (most of it compiling), for the budget
# (measured on an H200: bench_infer's two max-autotune compiles took 384 s of the first run)
COST = {"bench_infer": 400, "bench_train": 100, "train_digits": 60, "dense": 30, "inductor_traffic": 30,
        "pytest_triton": 90, "bench_infer_eager": 10, "families": 15, "fuse": 25, "kernels": 25, "graphs": 10}


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
    rows.append(("infer: fused / timm_eager (bf16 b256)", _ratio(inf, best, "timm_eager"),
                 TARGETS["infer: fused / timm_eager (bf16 b256)"], f"{best} / timm_eager"))
    rows.append(("infer: fused / timm_compile max-autotune (bf16 b256)", _ratio(inf, best, "timm_compile"),
                 TARGETS["infer: fused / timm_compile max-autotune (bf16 b256)"], f"{best} / timm_compile"))
    shares = [v["share_of_copy"] for k, v in results.get("kernels", {}).items() if isinstance(v, dict)
              and "share_of_copy" in v and math.isfinite(v["share_of_copy"])]
    rows.append(("kernels: share of copy bandwidth", min(shares) if shares else None,
                 TARGETS["kernels: share of copy bandwidth"], "worst kernel and shape (all in the kernels table)"))
    rows.append(("train: fast / timm_eager (bf16 b128)", _ratio(tr, "fast", "timm_eager"),
                 TARGETS["train: fast / timm_eager (bf16 b128)"], "fast / timm_eager"))
    fast = max(("fast", "fast_compile"), key=lambda m: (tr.get(m) or {}).get("images_per_s") or 0)
    rows.append(("train: fast / timm_compile (bf16 b128)", _ratio(tr, fast, "timm_compile"),
                 TARGETS["train: fast / timm_compile (bf16 b128)"], f"{fast} / timm_compile"))
    rows.append(("train: peak memory fast / timm_eager", _ratio(tr, "fast", "timm_eager", "peak_mem_mib"),
                 TARGETS["train: peak memory fast / timm_eager"], "allocator peak during a step"))
    fz = results.get("fuse", {})
    for dt, key in (("bfloat16", "fused logits rel. diff bf16"), ("float32", "fused logits rel. diff fp32")):
        vals = [v["rel_vs_plain_same_dtype"] for k, v in fz.items() if f"/{dt}/triton" in k]
        rows.append((key, max(vals) if vals else None, TARGETS[key], "worst family, triton backend, vs plain model"))
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
    if ceil:
        lines += ["", f"Ceilings: copy {ceil.get('copy_GBps', 0):.0f} GB/s (torch {ceil.get('torch_copy_GBps', 0):.0f}, "
                  f"Triton {ceil.get('triton_copy_GBps', 0):.0f}), bf16 GEMM {ceil.get('bf16_gemm_TFLOPs', 0):.0f} TFLOP/s"]
        pred = traffic.predictions(224, ceil.get("copy_GBps", 4300) * 1e9)
        lines.append("Traffic model at that bandwidth (S12 224 bf16): " + ", ".join(
            f"{k} {v['mb_per_image']:.1f} MB/image -> {v['images_per_s']:.0f} images/s" for k, v in pred.items()))
    for sec in ("bench_infer", "bench_train", "bench_infer_eager"):
        rows = results.get(sec)
        if isinstance(rows, dict) and rows and "error" not in rows:
            lines += ["", f"## {sec}", "", "| mode | images/s | min-max | latency ms | peak MiB | rel diff | note |",
                      "|---|---:|---|---:|---:|---:|---|"]
            for mode, r in rows.items():
                mem = "" if r.get("peak_mem_mib") is None else f"{r['peak_mem_mib']:.0f}"
                rd = "" if r.get("rel_diff") is None else f"{r['rel_diff']:.2e}"
                lines.append(f"| {mode} | {r['images_per_s']:.0f} | {r['min']:.0f}-{r['max']:.0f} | "
                             f"{r['latency_ms']:.2f} | {mem} | {rd} | {r.get('note', '')} |")
    for sec in ("graphs", "kernels", "fuse", "families", "train_digits", "export", "dense", "inductor_traffic",
                "pytest_triton"):
        if sec in results:
            lines += ["", f"## {sec}", "", "```", json.dumps(results[sec], indent=1, default=str)[:20000], "```"]
    errors = {k: v for k, v in results.items() if isinstance(v, dict) and "error" in v}
    if errors:
        lines += ["", "## Errors", ""] + [f"- {k}: {v['error']}" for k, v in errors.items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for gpu_check.json / gpu_check.md")
    ap.add_argument("--dry-run", action="store_true", help="the same code on the CPU at tiny sizes (Triton interpreted)")
    ap.add_argument("--only", help="comma-separated sections (default: all): " + ",".join(SECTIONS))
    ap.add_argument("--budget", type=float, default=460, help="seconds; sections that would not fit are skipped")
    ap.add_argument("--full", action="store_true", help="also compile the fast training path (bench and digits runs)")
    args = ap.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; use --dry-run on a CPU", file=sys.stderr)
        return 2
    names = args.only.split(",") if args.only else list(SECTIONS)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        print(f"gpu_check: unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    c = Check(args.dry_run, Path(args.out))
    c.full = args.full
    prev = Path(args.out) / "gpu_check.json"
    if args.only and prev.exists():  # a partial rerun adds to the last report
        c.results = json.loads(prev.read_text())
    if "env" not in names:
        c.results["env"] = sec_env(c)
    t_start = time.time()
    for name in names:
        left = args.budget - (time.time() - t_start)
        if not args.dry_run and left < COST.get(name, 20):
            c.results[name] = {"error": f"skipped: {left:.0f}s of the budget left, the section needs ~{COST.get(name, 20)}s"}
            print(f"[gpu_check] {name}: skipped (budget)", flush=True)
            c.save()
            continue
        t0 = time.time()
        print(f"[gpu_check] {name} ...", flush=True)
        try:
            c.results[name] = SECTIONS[name](c)
        except Exception as e:  # noqa: BLE001 (every section reports; one failure must not hide the rest)
            c.results[name] = {"error": f"{type(e).__name__}: {e}"[:500],
                               "traceback": traceback.format_exc().splitlines()[-12:]}
        if c.device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"[gpu_check] {name}: {time.time() - t0:.0f}s", flush=True)
        c.save()
    print(report({k: c.results[k] for k in ("env", "ceilings", "bench_infer", "bench_train") if k in c.results}
                 | {k: v for k, v in c.results.items() if k in ("fuse", "kernels")}).split("## bench_infer")[0])
    errors = [k for k, v in c.results.items() if isinstance(v, dict) and "error" in v]
    print(f"[gpu_check] done in {time.time() - t_start:.0f}s; sections with errors: {errors or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
