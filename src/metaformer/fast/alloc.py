"""Keep freed activation memory in the process instead of handing it back to the OS (CPU).

PyTorch's CPU allocator is plain ``malloc``. glibc serves blocks above its mmap threshold
(128 KiB at start, adapting up to 32 MiB) with fresh ``mmap`` pages and unmaps them on
``free``, so every large activation is page-faulted in again on every forward: a 4C-wide
PoolFormer-S12 map at batch 32 is ~100 MB, and faulting it in costs ~25 ms on the 2-core
machine of ``benchmarks/README.md``, more than the GELU that fills it (~9 ms). Whether a
given tensor pays this depends on the allocator's history, so the same model ran from 35 to
46 images/s depending on what ran before it in the process.

Raising the mmap and trim thresholds keeps those blocks in glibc's heap for reuse (what
jemalloc and tcmalloc do by default). The cost: the process keeps its peak heap until it
exits, right for a benchmark or a training run, not for a server (``metaformer serve`` leaves glibc's
defaults and calls :func:`release_freed_memory` after bursts). The ``metaformer`` command line applies
this at start-up for its other verbs; library users call
:func:`keep_freed_memory` themselves, or set ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` in the environment. ``METAFORMER_MALLOC=default`` turns it off.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
DEFAULT_THRESHOLD = 1 << 30  # blocks above 1 GiB still get their own mapping

_state = {"applied": False}


def _glibc(name: str, argtypes: list):
    """glibc's function ``name`` (returning an int), or None off Linux or where the C library has no such
    function (musl and other libcs have neither mallopt nor malloc_trim)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = argtypes, ctypes.c_int
    return fn


def keep_freed_memory(threshold: int = DEFAULT_THRESHOLD) -> bool:
    """Make glibc keep freed blocks up to ``threshold`` bytes for reuse; True if it now does.

    Does nothing (False) off Linux/glibc, with ``METAFORMER_MALLOC=default``, or when the
    user already chose thresholds through glibc's own ``MALLOC_*_THRESHOLD_`` variables.
    """
    if not 0 < threshold < 2 ** 31:
        raise ValueError(f"threshold must be between 1 byte and 2 GiB (mallopt takes an int), got {threshold}")
    if os.environ.get("METAFORMER_MALLOC", "").lower() == "default":
        return False
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") or os.environ.get("MALLOC_TRIM_THRESHOLD_"):
        return False
    mallopt = _glibc("mallopt", [ctypes.c_int, ctypes.c_int])
    if mallopt is None:
        return False
    ok = mallopt(M_MMAP_THRESHOLD, threshold) == 1 and mallopt(M_TRIM_THRESHOLD, threshold) == 1
    _state["applied"] = _state["applied"] or ok
    return ok


def release_freed_memory() -> bool:
    """Hand the free pages of every glibc arena back to the OS (``malloc_trim(0)``); True if it did.

    For a long-lived process (``metaformer serve``) after a burst of large allocations: glibc returns only
    the top of each heap on its own, so memory freed by threads that decoded large images stays counted
    against the process until it exits. Does nothing (False) off Linux/glibc.
    """
    trim = _glibc("malloc_trim", [ctypes.c_size_t])
    return trim is not None and trim(0) == 1


def resident_bytes() -> int | None:
    """This process's resident memory in bytes (Linux's ``/proc/self/statm``), or None where there is none."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def malloc_mode() -> str:
    """How this process's allocator is set up, for benchmark reports."""
    if _state["applied"]:
        return "kept (metaformer.fast.keep_freed_memory)"
    env = {k: os.environ[k] for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_") if k in os.environ}
    return ", ".join(f"{k}={v}" for k, v in env.items()) if env else "glibc default"
