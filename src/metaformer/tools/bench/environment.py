"""The machine a benchmark ran on, written beside its results: CPU model and instruction set, oneDNN's
paths, threads, the GPU, library versions, the allocator, and the load other processes put on the cores."""
from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import time

import torch


def environment() -> dict:
    import importlib.metadata as md

    from ...fast.alloc import malloc_mode

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
    from ...fast.fuse import cpu_capabilities

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
