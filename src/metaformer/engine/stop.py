"""How a run stops early: Ctrl-C or SIGTERM ask the loop to save and stop between two steps; a NaN loss stops it."""
from __future__ import annotations

import signal
import threading
from typing import Callable


class Interrupted(RuntimeError):
    """Ctrl-C or SIGTERM stopped a run; a checkpoint was saved (the message says where and how to go on)."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the step was not applied (the message names the last good checkpoint)."""


class GracefulStop:
    """``with GracefulStop(log) as stop: ... if stop.requested: save and raise Interrupted``.

    The first signal only sets :attr:`requested` (the loop finishes its step, saves, stops); a
    second Ctrl-C aborts at once. Handlers are installed only in the main thread and restored on exit.
    """

    def __init__(self, log: Callable[[str], None] = print):
        self.log = log
        self.signal: str | None = None
        self._old: dict = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:  # a second Ctrl-C: give up at once
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        self.log(f"\n{self.signal}: saving a checkpoint after this step (Ctrl-C again to abort without saving)")

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
