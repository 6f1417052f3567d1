import os

import torch

# Under pytest-xdist each worker gets one core; two threads per worker on 2 cores only thrash.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
