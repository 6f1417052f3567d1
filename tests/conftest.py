import os

import torch

# Under pytest-xdist each worker gets one core; two threads per worker on 2 cores only thrash.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

# Without a GPU, Triton kernels run under Triton's interpreter on the CPU (tests/test_triton.py).
# Set before anything imports triton: triton.jit reads it when a kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
