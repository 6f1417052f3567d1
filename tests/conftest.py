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
