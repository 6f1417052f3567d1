"""Peak memory: what one training step, or one inference call, adds to what is already in memory.

On CUDA the allocator's own peak (exact and cheap). On CPU the resident set: a training step's peak is
read in a fresh subprocess per mode (the high-water mark is process-wide, so modes sharing a process
would hide each other's peaks), an inference call's by a thread sampling it every millisecond. For RSS to
follow live memory, glibc must return large frees to the system: :data:`MALLOC_ENV`.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from typing import Callable

import torch

from ...fast.alloc import resident_bytes
from ...zoo import create_model
from .modes import CL_TRAIN_MODES, build_train_mode, train_step_fn


# glibc raises its mmap threshold after large frees, after which freed activations stay in the
# heap and RSS stops tracking live memory; a fixed threshold keeps large tensors mmap-backed.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def reexec_with_fixed_mmap_threshold() -> None:
    """Restart this process once with :data:`MALLOC_ENV` so RSS-based peak memory is meaningful."""
    if sys.platform.startswith("linux") and os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, **MALLOC_ENV})


def _rss_mib() -> float:
    rss = resident_bytes()
    if rss is None:
        raise OSError("resident memory is read from /proc/self/statm, which this system does not have")
    return rss / 2 ** 20


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
    step = train_step_fn(net, x, target, mode in CL_TRAIN_MODES, dtype)
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


def memprobe(spec: str) -> None:
    s = json.loads(spec)
    print(train_memory(s["variant"], s["mode"], s["batch"], s["img_size"], in_subprocess=False,
                       dtype=s.get("dtype", "fp32"), **s["overrides"]))
