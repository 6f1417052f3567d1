"""The harness: every mode of one configuration built in one process, warmed up and timed interleaved
(:func:`~.timing.interleaved_timing`), each mode's logits compared with its reference, one :class:`~.report.Result`
per mode. A mode that cannot run here (a missing backend, no GPU) is skipped with its reason; the others go on."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
from torch import nn

from ...zoo import create_model
from .memory import inference_peak_memory, train_memory
from .modes import (CL_TRAIN_MODES, DTYPES, build_infer_mode, build_train_mode, gemm_fn, gflop_per_image,
                    randomize_affine, timm_reference, train_step_fn)
from .report import Result
from .timing import interleaved_timing


def _set_times(r: Result, ts: list[float], images_per_call: float) -> float:
    """``r``'s latency (the median call) and images/s at the median, slowest and fastest call of the seconds
    ``ts``; returns the median."""
    med = statistics.median(ts)
    r.latency_ms = med * 1e3
    r.images_per_s, r.images_per_s_min, r.images_per_s_max = (images_per_call / t for t in (med, max(ts), min(ts)))
    return med


def bench_inference(variant: str, modes: list[str], batch: int, img_size: int, dtype: str = "fp32",
                    device: str = "cpu", repeats: int = 10, warmup: int = 3, model: nn.Module | None = None,
                    log: Callable[[str], None] = print, exported: str | None = None, fuse_kwargs: dict | None = None,
                    **overrides) -> list[Result]:
    device = torch.device(device)
    tdtype = DTYPES[dtype]
    torch.manual_seed(0)
    if model is None:
        model = create_model(variant, img_size=img_size, **overrides)
        randomize_affine(model)
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
                fn, gemm_gflop = gemm_fn(tdtype, device)
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
                from ...fast import fusion_report

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
                if mode == "gemm_ceiling":
                    # images/s the model would reach if every FLOP ran at this GEMM rate
                    med = _set_times(r, times[mode], gflop[mode] / per_image)
                    r.extra["gemm_gflops"] = gflop[mode] / med
                else:
                    _set_times(r, times[mode], batch)
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
            steps[mode] = train_step_fn(net, x, target, mode in CL_TRAIN_MODES, dtype)
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
            _set_times(r, times[mode], batch)
            if memory:
                r.peak_mem_mib = train_memory(variant, mode, batch, img_size, device, dtype=dtype, **overrides)
        results.append(r)
    return results
