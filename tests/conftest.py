import ctypes
import os

import torch

# Under pytest-xdist each worker gets one core; two threads per worker on 2 cores only thrash.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

# Without a GPU, Triton kernels run under Triton's interpreter on the CPU (tests/test_triton.py).
# Set before anything imports triton: triton.jit reads it when a kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import sys  # noqa: E402

import pytest  # noqa: E402

# Modules that import an optional package and, once loaded, would keep answering from sys.modules: unloaded with
# it, so that importing them again runs into the hidden package as it would without it.
_WRAPPERS = {"tensorboard": ("torch.utils.tensorboard",)}


@pytest.fixture
def hide(monkeypatch):
    """``hide('tensorboard', ...)``: from now on in this test, importing those packages fails as if they were not
    installed (as in an environment without their extra), loaded or not; restored afterwards. CI installs every
    extra, so this is how the messages for a missing one are tested."""
    def hide_modules(*names: str) -> None:
        wrappers = {w for n in names for w in _WRAPPERS.get(n, ())}
        for key in list(sys.modules):
            if any(key == w or key.startswith(w + ".") for w in wrappers):
                monkeypatch.delitem(sys.modules, key)
            elif any(key == n or key.startswith(n + ".") for n in names):
                monkeypatch.setitem(sys.modules, key, None)
        for n in names:
            monkeypatch.setitem(sys.modules, n, None)
    return hide_modules


@pytest.fixture
def no_server(monkeypatch):
    """``metaformer serve`` runs up to the point where uvicorn would take over the process (the model loaded, the
    app built with the command line's limits) and returns; the list records each app it would have served."""
    import metaformer.tools.serve as serve

    started = []
    monkeypatch.setattr(serve, "run_server", lambda app, host, port, log_level: started.append((app, host, port)))
    return started


class _SignalStack(ctypes.Structure):
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


_SS_DISABLE = 2  # <bits/sigstack.h> on Linux


def _unmapped_signal_stack():
    """The address of this thread's alternate signal stack when it lies in no mapping of the process (None when
    it is mapped, disabled, or this is not Linux). Signals are delivered on that stack: an unmapped one turns
    the next signal handled here into SIGSEGV."""
    if not sys.platform.startswith("linux"):
        return None
    current = _SignalStack()
    if ctypes.CDLL(None).sigaltstack(None, ctypes.byref(current)) != 0 or current.ss_flags & _SS_DISABLE:
        return None
    with open("/proc/self/maps") as maps:
        for line in maps:
            lo, hi = (int(a, 16) for a in line.split(None, 1)[0].split("-"))
            if lo <= current.ss_sp < hi:
                return None
    return current.ss_sp


@pytest.fixture(autouse=True)
def signal_stack_stays_mapped():
    """Every test leaves the process able to handle a signal: a library that leaves the thread's alternate signal
    stack pointing at freed memory fails the test that did it (and the stack is switched off, so that the later
    tests in this process are not killed by the next SIGCHLD or Ctrl-C)."""
    yield
    address = _unmapped_signal_stack()
    if address is not None:
        ctypes.CDLL(None).sigaltstack(ctypes.byref(_SignalStack(None, _SS_DISABLE, 0)), None)
        pytest.fail(f"this test left the thread's alternate signal stack at 0x{address:x}, which is no longer "
                    "mapped: the next signal handled in this process would kill it with SIGSEGV")
