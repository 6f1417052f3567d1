"""Timing: a timer that reads the right clock for the device, and the interleaved loop every mode is timed in.

:func:`median_time` times one function alone (what a script measuring a kernel or a copy needs);
:func:`interleaved_timing` times several side by side, each repeat visiting every one in a rotated
order, so that background load and thermal drift hit them all alike.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch


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
    """The timer for ``device``: CUDA events on a GPU, the host clock elsewhere."""
    return EventTimer(device) if device.type == "cuda" else Timer(device)


def interleaved_timing(fns: dict[str, Callable], x: Any, device, repeats: int, warmup: int,
                       min_time: float = 0.0, timer: Timer | None = None) -> dict[str, list[float]]:
    """Seconds per call ``fn(x)`` for each fn, ``repeats`` samples each; each repeat visits every fn once, in a
    rotated order. ``min_time``: a sample calls its fn as often as it takes to last about that long (tiny
    batches are not timer noise), and reports the time per call."""
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


def median_time(fn: Callable[[], Any], device, repeats: int = 20, warmup: int = 3, timer: Timer | None = None) -> float:
    """Median seconds per call of ``fn()`` (no argument), after ``warmup`` calls, timed by :func:`make_timer`'s
    clock for ``device`` (CUDA events on a GPU), the same loop the benchmark modes run in.

    For the kernels' own time without the host's launch gaps, capture ``n`` calls in a CUDA graph and time
    ``graph.replay`` with this, divided by ``n``."""
    return statistics.median(interleaved_timing({"fn": lambda _x: fn()}, None, device, repeats, warmup,
                                                timer=timer)["fn"])
