"""The one benchmark harness: our modes against timm (same weights) and ONNX Runtime, side by side.

Every mode of one configuration (variant, batch, resolution, dtype) is built in the same
process, warmed up, then timed *interleaved*: each repeat runs every mode once, in a rotated
order, so background load and thermal drift hit all modes alike. We report the median, min
and max over repeats, plus each mode's max abs logit difference from our plain fp32 model
(timm modes: from timm's own eager fp32 model, since timm's heads legitimately differ from the
authors': PoolFormer v1 normalises after pooling, ConvFormer/CAFormer's MLP head uses LayerNorm
eps 1e-6 where the authors use 1e-5).

Peak training memory is RSS growth on CPU, measured in a fresh subprocess per mode (RSS is a
process-wide high-water mark, so modes sharing a process would hide each other's peaks),
and ``torch.cuda.max_memory_allocated`` on CUDA. Times come from a :class:`Timer`: the host clock
on CPU, CUDA events on a GPU (``benchmarks/gpu_check.py`` runs this harness on one).

Used by ``metaformer bench`` and by the scripts in ``benchmarks/``.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn

from ..errors import ConfigError
from ..zoo import create_model

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CL = torch.channels_last

INFER_MODES = ["eager", "eager_cl", "fused", "fused_graph", "fused_compile", "ort", "int8_ort", "int8_pt2e",
               "timm_eager", "timm_cl", "timm_compile", "timm_ort", "gemm_ceiling"]
TRAIN_MODES = ["eager", "eager_cl", "fast", "fast_compile", "timm_eager", "timm_cl", "timm_compile"]
# Fair by default: the strongest peer (timm compiled) is always beside ours.
DEFAULT_INFER = ["eager", "eager_cl", "fused", "timm_eager", "timm_cl", "timm_compile", "gemm_ceiling"]
DEFAULT_TRAIN = ["eager", "fast", "timm_eager", "timm_cl", "timm_compile"]


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


# ----------------------------------------------------------------------------- helpers
def gflop_per_image(model: nn.Module, img_size: int) -> float:
    """2 x the conv and linear MACs (what a GEMM-bound ceiling is measured in)."""
    from .complexity import count_macs

    with torch.device("meta"):  # the model owns its config: the same network, without weights
        meta = type(model)(**model.config)
    return 2 * count_macs(meta, img_size)["matmul_conv"] / 1e9


def _is_the_variant(model: nn.Module) -> bool:
    """The model is its variant as the zoo builds it (no depth/width/mixer overrides): what timm also has."""
    name = getattr(model, "variant", None)
    if not name:
        return False
    with torch.device("meta"):
        ref = create_model(name, num_classes=model.num_classes, img_size=model.config.get("img_size", 224))
    ignore = ("drop_path_rate", "drop_rate", "head_dropout")  # training-time only: the same network
    return {k: v for k, v in ref.config.items() if k not in ignore} == \
        {k: v for k, v in model.config.items() if k not in ignore}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Seconds spent by the work between :meth:`start` and :meth:`stop`, the work done when ``stop``
    returns. The host clock around a synchronisation measures CPU work exactly; on a GPU,
    :class:`EventTimer` reads the device's own clock (events recorded in the stream), so queueing
    and launch latency before the first kernel stay out of the figure."""

    def __init__(self, device: torch.device):
        self.device = device

    def start(self) -> None:
        synchronize(self.device)
        self._t0 = time.perf_counter()

    def stop(self) -> float:
        synchronize(self.device)
        return time.perf_counter() - self._t0


class EventTimer(Timer):
    """Device events around the work (``event`` makes one: ``torch.cuda.Event`` with timing on a GPU;
    tests pass a stand-in with the same ``record`` / ``synchronize`` / ``elapsed_time`` surface)."""

    def __init__(self, device: torch.device, event: Callable | None = None):
        super().__init__(device)
        self.event = event or (lambda: torch.cuda.Event(enable_timing=True))

    def start(self) -> None:
        self._start, self._end = self.event(), self.event()
        self._start.record()

    def stop(self) -> float:
        self._end.record()
        self._end.synchronize()
        return self._start.elapsed_time(self._end) / 1e3  # elapsed_time is in milliseconds


def make_timer(device: torch.device) -> Timer:
    return EventTimer(device) if device.type == "cuda" else Timer(device)


# Our variants that timm implements itself, under the same name (timm has no IdentityFormer or RandFormer).
TIMM_FAMILIES = ("poolformer", "poolformerv2", "convformer", "caformer")


def timm_reference(model: nn.Module) -> nn.Module | None:
    """timm's own model of the same variant (``poolformer_*``, ``poolformerv2_*``, ``convformer_*``,
    ``caformer_*``) with our weights, written in timm's layout."""
    try:
        import timm
    except ImportError:
        return None
    from ..weights import from_ours

    name = getattr(model, "variant", None) or ""
    if name.split("_")[0] not in TIMM_FAMILIES or name not in timm.list_models(name) or not _is_the_variant(model):
        return None
    ref = timm.create_model(name, pretrained=False, num_classes=model.num_classes)
    ref.load_state_dict(from_ours(model.state_dict(), "timm"), strict=True)
    return ref.eval()


def _cast(model: nn.Module, dtype: torch.dtype, device, channels_last: bool) -> nn.Module:
    model = model.to(device=device, dtype=dtype)
    return model.to(memory_format=CL) if channels_last else model


def compile_options(device: torch.device, inference: bool = True) -> dict:
    """Inductor options for a fair compiled peer: inference on a GPU in max-autotune (GEMM templates
    tuned per shape, CUDA graphs), with freezing (weights become constants: on CPU, oneDNN
    pre-packing and post-op fusion); training in the default mode (what ``train --compile`` uses).
    Passed per call, so nothing global changes."""
    import torch._inductor

    if not inference:
        return {}
    options = dict(torch._inductor.list_mode_options("max-autotune")) if device.type == "cuda" else {}
    options["freezing"] = True
    return options


def _compile(model: nn.Module, device: torch.device | None = None, inference: bool = True):
    device = device or next(model.parameters()).device
    return torch.compile(model, options=compile_options(device, inference))


def cuda_graph(fn: Callable, x: torch.Tensor) -> Callable:
    """``fn`` captured once in a CUDA graph and replayed (one launch for the whole forward: what
    ``mode='max-autotune'`` gives a compiled model). The input is copied into the captured buffer."""
    static = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up outside the graph (kernel compilation, allocator)
            fn(static)
        expected = fn(static).float()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(static)

    def replay(inp: torch.Tensor) -> torch.Tensor:
        static.copy_(inp)
        graph.replay()
        return out

    # A replay that differs from the eager call (seen once on an H200: NaN logits from a replay that
    # matched eager at a smaller batch) must not be timed as if it were the model.
    got = replay(x).float()
    if not torch.isfinite(got).all() or (got - expected).abs().max() > 1e-3 * expected.abs().max().clamp_min(1):
        raise RuntimeError(f"the CUDA graph's replay differs from the eager call (max abs difference "
                           f"{(got - expected).abs().max().item():.3g}); not timed")
    return replay


def _ort_session(model: nn.Module, x: torch.Tensor):
    """Export ``model`` to ONNX (TorchScript exporter, as timm's export) and open it in ONNX Runtime."""
    with tempfile.TemporaryDirectory(prefix="metaformer-bench-") as tmp:  # the session holds the graph
        path = os.path.join(tmp, "model.onnx")
        torch.onnx.export(model, (x,), path, input_names=["x"], output_names=["logits"], opset_version=17,
                          dynamic_axes={"x": {0: "batch"}}, dynamo=False)
        return ort_file(path)


def ort_file(path: str | os.PathLike):
    """An ONNX file (fp32 or int8) in ONNX Runtime's session, as eval, predict and serve run it
    (:func:`metaformer.tools.exported.ort_session`)."""
    from .exported import ort_session

    sess = ort_session(path)
    name = sess.get_inputs()[0].name
    return lambda t: torch.from_numpy(sess.run(None, {name: t.numpy()})[0])


def _int8(backend: str, model: nn.Module, x: torch.Tensor):
    """``model`` quantized to int8 by ``backend`` (``ort`` or ``pt2e``; see :mod:`metaformer.tools.quantize`),
    calibrated on random images: int8 kernels take the same time whatever the ranges, and the diff column
    shows what int8 costs on such inputs."""
    from .exported import compile_int8
    from .quantize import pt2e_program, quantize_to_file

    calib = torch.randn(16, *x.shape[1:], generator=torch.Generator().manual_seed(1))
    if backend == "ort":
        with tempfile.TemporaryDirectory(prefix="metaformer-bench-") as tmp:
            return ort_file(quantize_to_file(model, calib, os.path.join(tmp, "int8.onnx"), "ort"))
    return compile_int8(pt2e_program(model, calib, 16).module())


def _gemm_fn(dtype: torch.dtype, device) -> tuple[Callable, float]:
    """The machine's GEMM throughput, measured beside the models: a 2048 x 1024 x 1024 GEMM.

    On CPU it runs as a oneDNN 1x1 convolution on pre-packed weights (8 x 16 x 16 tokens,
    1024 -> 1024 channels): the primitive the fused model's convs use, and the fastest GEMM
    form measured here (~220 GFLOP/s fp32 against ~185 for ``torch.mm`` on the machine of
    ``benchmarks/README.md``), so the ceiling is the strict one. Elsewhere: ``torch.mm``
    into a preallocated output.
    """
    from ..fast.fuse import FusedConv, mkldnn_available

    g = torch.Generator().manual_seed(0)
    if mkldnn_available(device) and dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(8, 1024, 16, 16, generator=g).to(dtype).contiguous(memory_format=CL)
        conv = FusedConv(nn.Conv2d(1024, 1024, 1, bias=False)).to(dtype)  # fuse()'s packed oneDNN call
        return torch.no_grad()(lambda _x: conv(x)), 2 * 2048 * 1024 * 1024 / 1e9
    n = 2048
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    return (lambda _x: torch.mm(a, b, out=out)), 2 * n ** 3 / 1e9


# ----------------------------------------------------------------------------- inference
def build_infer_mode(mode: str, model: nn.Module, dtype: torch.dtype, device, x: torch.Tensor,
                     exported: str | None = None, fuse_kwargs: dict | None = None):
    """Returns (fn, diff reference) or raises to skip the mode. ``exported``: the file the ``exported`` mode
    times (from ``metaformer export`` or ``metaformer quantize``; its weights, not ``model``'s). ``fuse_kwargs``:
    options of ``fuse()`` for the ``fused`` modes (e.g. ``gemm``, a measured GEMM table)."""
    fk = fuse_kwargs or {}
    from ..fast import fuse

    if mode == "eager":
        return _cast(copy.deepcopy(model), dtype, device, False), "eager_fp32"
    if mode == "eager_cl":
        return _cast(copy.deepcopy(model), dtype, device, True), "eager_fp32"
    if mode == "fused":
        return fuse(_cast(copy.deepcopy(model), dtype, device, False), **fk), "eager_fp32"
    if mode == "fused_graph":
        if device.type != "cuda":
            raise RuntimeError("CUDA graphs need a GPU")
        fused = fuse(_cast(copy.deepcopy(model), dtype, device, False), **fk)
        return cuda_graph(fused, x.contiguous(memory_format=CL)), "eager_fp32"
    if mode == "fused_compile":
        fused = fuse(_cast(copy.deepcopy(model), dtype, device, False), backend="aten")
        return _compile(fused, device), "eager_fp32"
    if mode == "ort":
        if device.type != "cpu" or dtype != torch.float32:
            raise RuntimeError("ONNX Runtime mode is CPU fp32 only here")
        return _ort_session(copy.deepcopy(model).eval(), x), "eager_fp32"
    if mode in ("int8_ort", "int8_pt2e"):
        if device.type != "cpu" or dtype != torch.float32:
            raise RuntimeError("the int8 modes run on the CPU, quantized from the fp32 model")
        return _int8(mode[5:], copy.deepcopy(model).eval(), x), "eager_fp32"
    if mode == "exported":
        if device.type != "cpu" or dtype != torch.float32 or exported is None:
            raise RuntimeError("the exported file runs on the CPU, from fp32 inputs (bench --exported FILE)")
        from .exported import load_runtime

        return load_runtime(exported), None
    if mode.startswith("timm_"):
        ref = timm_reference(model)
        if ref is None:
            raise RuntimeError("timm is not installed or has no such variant")
        kind = mode[5:]
        if kind == "eager":
            return _cast(ref, dtype, device, False), "timm_fp32"
        if kind == "cl":
            return _cast(ref, dtype, device, True), "timm_fp32"
        if kind == "compile":
            return _compile(_cast(ref, dtype, device, True), device), "timm_fp32"
        if kind == "ort":
            if device.type != "cpu" or dtype != torch.float32:
                raise RuntimeError("ONNX Runtime mode is CPU fp32 only here")
            return _ort_session(ref, x), "timm_fp32"
    raise ConfigError(f"unknown inference mode {mode!r}; choose from {INFER_MODES}")


def interleaved_timing(fns: dict[str, Callable], x: torch.Tensor, device, repeats: int, warmup: int,
                       min_time: float = 0.0, timer: Timer | None = None) -> dict[str, list[float]]:
    """Seconds per call for each fn; each repeat visits every fn once, in a rotated order."""
    device = torch.device(device)
    timer = timer or make_timer(device)
    names = list(fns)
    if not names:  # every mode was skipped (each with its reason): nothing to time
        return {}
    for name in names:
        for _ in range(warmup):
            fns[name](x)
        synchronize(device)
    inner = {}
    for name in names:  # enough calls per sample that tiny batches are not timer noise
        timer.start()
        fns[name](x)
        inner[name] = max(1, int(min_time / max(timer.stop(), 1e-6)))
    times = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            timer.start()
            for _ in range(inner[name]):
                fns[name](x)
            times[name].append(timer.stop() / inner[name])
    return times


def bench_inference(variant: str, modes: list[str], batch: int, img_size: int, dtype: str = "fp32",
                    device: str = "cpu", repeats: int = 10, warmup: int = 3, model: nn.Module | None = None,
                    log: Callable[[str], None] = print, exported: str | None = None, fuse_kwargs: dict | None = None,
                    **overrides) -> list[Result]:
    device = torch.device(device)
    tdtype = DTYPES[dtype]
    torch.manual_seed(0)
    if model is None:
        model = create_model(variant, img_size=img_size, **overrides)
        _randomize_affine(model)
    elif exported is not None and "exported" not in modes:
        modes = [*modes, "exported"]
    model.eval()
    x32 = torch.randn(batch, 3, img_size, img_size)
    x = x32.to(device=device, dtype=tdtype)
    with torch.inference_mode():
        ref_out = {"eager_fp32": model.to(device)(x32.to(device)).float()}
        ref = timm_reference(model) if any(m.startswith("timm_") for m in modes) else None
        if ref is not None:
            ref_out["timm_fp32"] = ref.to(device)(x32.to(device)).float()
    fns, refs, notes, gflop = {}, {}, {}, {}
    for mode in modes:
        try:
            if mode == "gemm_ceiling":
                fn, gemm_gflop = _gemm_fn(tdtype, device)
                fns[mode], gflop[mode] = fn, gemm_gflop
                continue
            built = time.perf_counter()
            fn, diff_ref = build_infer_mode(mode, model, tdtype, device, x, exported, fuse_kwargs)
            with torch.inference_mode():
                fn(x)  # compile / export happens here, outside the timed loop
            fns[mode], refs[mode] = fn, diff_ref
            if "compile" in mode or mode.startswith(("int8", "ort", "timm_ort")):
                notes[mode] = f"built in {time.perf_counter() - built:.0f} s (export, quantization, compilation)"
            if mode == "fused":  # what ran: the blocks fused, and the conv path this CPU allows
                from ..fast import fusion_report

                notes[mode] = fusion_report(fn).summary()
        except Exception as e:  # a missing optional backend must not sink the other modes
            notes[mode] = f"skipped: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
            log(f"  {mode}: {notes[mode]}")
    per_image = gflop_per_image(model, img_size)  # outside inference_mode: the counter needs dispatch
    with torch.inference_mode():
        times = interleaved_timing(fns, x, device, repeats, warmup, min_time=0.2 if batch <= 2 else 0.0)
        results = []
        for mode in modes:
            r = Result("infer", mode, variant, batch, img_size, dtype, device.type, note=notes.get(mode, ""))
            if mode in times:
                ts = times[mode]
                med = statistics.median(ts)
                r.latency_ms = med * 1e3
                if mode == "gemm_ceiling":
                    # images/s the model would reach if every FLOP ran at this GEMM rate
                    r.extra["gemm_gflops"] = gflop[mode] / med
                    r.images_per_s, r.images_per_s_min, r.images_per_s_max = (
                        gflop[mode] / t / per_image for t in (med, max(ts), min(ts)))
                else:
                    r.images_per_s, r.images_per_s_min, r.images_per_s_max = (
                        batch / t for t in (med, max(ts), min(ts)))
                    out = fns[mode](x).float()
                    if refs[mode] is not None:  # None: a file with its own weights (bench --exported)
                        r.diff_ref = refs[mode]
                        r.max_abs_diff = (out - ref_out[refs[mode]]).abs().max().item()
                        ref = ref_out[refs[mode]]
                        r.extra["rel_diff"] = ((out - ref).norm() / ref.norm().clamp_min(1e-12)).item()
                    if device.type == "cuda":  # the allocator's peak is exact and cheap to read
                        r.peak_mem_mib = inference_peak_memory(fns[mode], x, device)
            r.gflop_per_image = per_image
            results.append(r)
    return results


def model_of_file(path: str) -> nn.Module:
    """The architecture an exported file was made from (stored in it by ``metaformer export`` / ``quantize``),
    with random weights, for the other modes to run beside the file."""
    from ..zoo import build_from_config
    from .exported import load_runtime

    meta = load_runtime(path).metadata or {}
    if not isinstance(meta.get("config"), dict):
        raise ConfigError(f"{path} does not carry its model's architecture (written by another tool or an older "
                          "metaformer): export or quantize it again")
    model = build_from_config(meta["config"], meta.get("variant"))
    _randomize_affine(model)
    return model.eval()


def _randomize_affine(model: nn.Module) -> None:
    """Non-trivial norm affines and layer scales, so exactness checks exercise every folded term
    (a fresh model's unit weights, zero biases and 1e-5 layer scales would hide folding bugs)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # norms, layer scales, and the Baselines' res scales and StarReLU scale/bias (``act.scale``/``act.bias``)
            if ".norm" in name or "layer_scale" in name or "res_scale" in name or ".act" in name:
                base = 1.0 if name.endswith(("weight", "scale")) else 0.0
                if "layer_scale" in name:
                    base = 0.1
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))


# ----------------------------------------------------------------------------- training
CL_TRAIN_MODES = ("eager_cl", "fast", "fast_compile", "timm_cl", "timm_compile")


def build_train_mode(mode: str, model: nn.Module, device):
    from ..fast.training import enable_fast_training

    device = torch.device(device)
    m = copy.deepcopy(model).to(device).train()
    if mode == "eager":
        return m
    if mode == "eager_cl":
        return m.to(memory_format=CL)
    if mode == "fast":
        return enable_fast_training(m)
    if mode == "fast_compile":
        return torch.compile(enable_fast_training(m), options=compile_options(device, inference=False))
    if mode.startswith("timm_"):
        ref = timm_reference(model)
        if ref is None:
            raise RuntimeError("timm is not installed or has no such variant")
        ref = ref.to(device).train()
        if mode == "timm_eager":
            return ref
        ref = ref.to(memory_format=CL)
        if mode == "timm_cl":
            return ref
        if mode == "timm_compile":
            return torch.compile(ref, options=compile_options(device, inference=False))
    raise ConfigError(f"unknown training mode {mode!r}; choose from {TRAIN_MODES}")


def _train_step_fn(net: nn.Module, x: torch.Tensor, target: torch.Tensor, channels_last: bool, dtype: str = "fp32"):
    """One optimizer step; ``bf16``/``fp16``: mixed precision under autocast (fp16 with a GradScaler),
    as ``metaformer train --amp`` runs it."""
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0.05)
    xin = x.contiguous(memory_format=CL) if channels_last else x
    loss_fn = nn.CrossEntropyLoss()
    dev = x.device.type
    amp = DTYPES[dtype] if dtype != "fp32" else None
    scaler = torch.amp.GradScaler(dev, enabled=amp is torch.float16)

    def step(_x=None):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev, dtype=amp or torch.float32, enabled=amp is not None):
            loss = loss_fn(net(xin), target)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return loss

    return step


# glibc raises its mmap threshold after large frees, after which freed activations stay in the
# heap and RSS stops tracking live memory; a fixed threshold keeps large tensors mmap-backed.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def reexec_with_fixed_mmap_threshold() -> None:
    """Restart this process once with :data:`MALLOC_ENV` so RSS-based peak memory is meaningful."""
    if sys.platform.startswith("linux") and os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, **MALLOC_ENV})


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _peak_rss_mib() -> float:
    """This process's own peak RSS. Not ``ru_maxrss``: Linux carries that over fork and exec, so a
    probe started by a large benchmark process would report its parent's high-water mark."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux; macOS: bytes


def train_memory(variant: str, mode: str, batch: int, img_size: int, device: str = "cpu", steps: int = 2,
                 in_subprocess: bool = True, dtype: str = "fp32", **overrides) -> float | None:
    """Peak memory (MiB) a training step adds over the model + optimizer + batch already in memory."""
    dev = torch.device(device)
    if dev.type == "cpu" and in_subprocess:
        cmd = [sys.executable, "-m", "metaformer.tools.bench", "--memprobe",
               json.dumps(dict(variant=variant, mode=mode, batch=batch, img_size=img_size, dtype=dtype,
                               overrides=overrides))]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **MALLOC_ENV})
        if out.returncode != 0:
            return None
        return float(out.stdout.strip().splitlines()[-1])
    torch.manual_seed(0)
    model = create_model(variant, img_size=img_size, **overrides)
    net = build_train_mode(mode, model, dev)
    del model
    x = torch.randn(batch, 3, img_size, img_size, device=dev)
    target = torch.randint(0, net.num_classes if hasattr(net, "num_classes") else 1000, (batch,), device=dev)
    step = _train_step_fn(net, x, target, mode in CL_TRAIN_MODES, dtype)
    if dev.type == "cuda":
        step()  # optimizer state exists after the first step; it is part of every mode's baseline
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        for _ in range(steps):
            step()
        torch.cuda.synchronize(dev)
        return (torch.cuda.max_memory_allocated(dev) - base) / 2 ** 20
    # The peak RSS is a high-water mark: read it with the model, optimizer and batch in
    # memory and no step run yet, so the growth is the steps' own peak (activations, gradients,
    # and the AdamW state the first step creates, the same for every mode).
    base = _peak_rss_mib()
    for _ in range(steps + 1):
        step()
    return _peak_rss_mib() - base


def bench_training(variant: str, modes: list[str], batch: int, img_size: int, device: str = "cpu",
                   repeats: int = 5, warmup: int = 2, memory: bool = True, log: Callable[[str], None] = print,
                   dtype: str = "fp32", **overrides) -> list[Result]:
    dev = torch.device(device)
    torch.manual_seed(0)
    model = create_model(variant, img_size=img_size, **overrides)
    x = torch.randn(batch, 3, img_size, img_size, device=dev)
    target = torch.randint(0, model.num_classes, (batch,), device=dev)
    steps, notes = {}, {}
    for mode in modes:
        try:
            net = build_train_mode(mode, model, dev)
            steps[mode] = _train_step_fn(net, x, target, mode in CL_TRAIN_MODES, dtype)
            steps[mode]()
        except Exception as e:
            notes[mode] = f"skipped: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
            log(f"  {mode}: {notes[mode]}")
            steps.pop(mode, None)
    times = interleaved_timing(steps, x, dev, repeats, warmup)
    results = []
    for mode in modes:
        r = Result("train", mode, variant, batch, img_size, dtype, dev.type, note=notes.get(mode, ""))
        if mode in times:
            ts = times[mode]
            med = statistics.median(ts)
            r.latency_ms = med * 1e3
            r.images_per_s, r.images_per_s_min, r.images_per_s_max = (batch / t for t in (med, max(ts), min(ts)))
            if memory:
                r.peak_mem_mib = train_memory(variant, mode, batch, img_size, device, dtype=dtype, **overrides)
        results.append(r)
    return results


# ----------------------------------------------------------------------------- reporting
def environment() -> dict:
    import importlib.metadata as md

    from ..fast.alloc import malloc_mode

    def version(pkg):
        with contextlib.suppress(Exception):
            return md.version(pkg)
        return None

    cpu = platform.processor()
    with contextlib.suppress(Exception):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    flags = set()
    with contextlib.suppress(Exception):
        flags = set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split())
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
           if f in flags]
    from ..fast.fuse import cpu_capabilities

    env = {
        "cpu": cpu, "isa": " ".join(isa) or "unknown", "onednn": cpu_capabilities().describe(),
        "threads": torch.get_num_threads(), "cores": os.cpu_count(),
        "avx512_bf16": "avx512_bf16" in flags, "amx": "amx_tile" in flags,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(), "torch": torch.__version__, "timm": version("timm"),
        "triton": version("triton"), "onnxruntime": version("onnxruntime"), "metaformer": version("metaformer"),
        "malloc": malloc_mode(),
        # other processes' load (1, 5, 15 min): above the core count, every mode's time includes waiting for a core
        "loadavg": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(cuda_runtime=torch.version.cuda, capability=f"{props.major}.{props.minor}",
                   gpu_memory_gib=round(props.total_memory / 2 ** 30, 1), multiprocessors=props.multi_processor_count)
        with contextlib.suppress(Exception):
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10)
            env["driver"] = out.stdout.strip().splitlines()[0]
    return env


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


def ratios(results: list[Result], baseline: str) -> dict[str, float]:
    """images/s of every mode divided by ``baseline``'s, within each configuration."""
    out = {}
    groups: dict[tuple, dict[str, Result]] = {}
    for r in results:
        groups.setdefault((r.task, r.variant, r.batch, r.img_size, r.dtype), {})[r.mode] = r
    for key, group in groups.items():
        if baseline not in group:
            continue
        for mode, r in group.items():
            out["/".join(map(str, key)) + f"/{mode}"] = r.images_per_s / group[baseline].images_per_s
    return out


def save_json(results: list[Result], path: str, argv: list[str] | None = None) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump({"environment": environment(), "command": argv, "results": [asdict(r) for r in results]},
                  f, indent=1, default=float)


def inference_peak_memory(fn: Callable, x: torch.Tensor, device) -> float:
    """Peak memory (MiB) one call adds: CUDA allocator peak, or on CPU the max RSS sampled every
    millisecond by a side thread (large tensors are mmap-backed and returned on free, so RSS
    tracks live activations; ru_maxrss would only ever show the process's first peak)."""
    import threading

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn(x)
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
    base, peak, done = _rss_mib(), [0.0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mib())
            time.sleep(0.001)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out = fn(x)
    done.set()
    t.join()
    del out
    return max(peak[0], _rss_mib()) - base


def _memprobe(spec: str) -> None:
    s = json.loads(spec)
    print(train_memory(s["variant"], s["mode"], s["batch"], s["img_size"], in_subprocess=False,
                       dtype=s.get("dtype", "fp32"), **s["overrides"]))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--memprobe":
        _memprobe(sys.argv[2])
    else:
        sys.exit("usage: python -m metaformer bench ... (this module is a library; see metaformer.commands.bench)")
