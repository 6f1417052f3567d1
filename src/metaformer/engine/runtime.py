"""The runtime every trainer shares: devices, torchrun's process group, mixed precision, seeding and the
random-number states a checkpoint needs for exact resume."""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from ..errors import ConfigError, MetaFormerError

T = TypeVar("T")
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Runtime:
    """This process: its rank in the run, the run's size, its device and its mixed precision."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    amp: str = "none"  # resolved: none, bf16 or fp16

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return AMP_DTYPES[self.amp]

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def log(self, message: str) -> None:
        """A line on rank 0 that does not break a progress bar."""
        if self.main:
            from tqdm import tqdm

            tqdm.write(message)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(t)
        return t

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any (e.g. a stop request, an empty batch)."""
        if not self.distributed:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t)
        return t.item() > 0

    def gather(self, obj: Any) -> list:
        """``obj`` of every rank, in rank order (on every rank)."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def setup(device: str | None = None, amp: str = "auto") -> Runtime:
    """The runtime of this process; joins torchrun's process group (NCCL on GPU, gloo on CPU) when run by it.

    ``amp``: ``auto`` (bf16 on GPU, off on CPU), ``none``, ``bf16`` or ``fp16``.
    """
    if amp not in ("auto", *AMP_DTYPES):
        raise ConfigError(f"--amp must be auto, none, bf16 or fp16, not {amp!r}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() if device in (None, "auto") else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} was asked for but no CUDA GPU is visible")
    if device not in (None, "auto") and not device.startswith(("cpu", "cuda")):
        raise ConfigError(f"--device must be cpu, cuda or cuda:N, not {device!r}")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    if use_cuda:
        if world > 1:
            index = int(os.environ.get("LOCAL_RANK", "0"))  # torchrun: one GPU per local rank
        else:
            index = torch.device(device).index or 0 if device not in (None, "auto") else 0
        torch.cuda.set_device(index)
        dev = torch.device("cuda", index)
    else:
        dev = torch.device("cpu")
    resolved = ("bf16" if dev.type == "cuda" else "none") if amp == "auto" else amp
    return Runtime(rank, world, dev, resolved)


def on_main(fn: Callable[[], T], is_main: bool) -> T | None:
    """Run ``fn`` on rank 0 only; a user error it raises is raised on every rank with the same message,
    so no rank waits forever in a collective the others never reach."""
    error, result = None, None
    if is_main:
        try:
            result = fn()
        except MetaFormerError as e:
            error = str(e)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise ConfigError(error)
    return result


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of one rank's epoch: seeding per (seed, epoch, rank) makes an epoch's randomness (data order,
    augmentation, Mixup, drop path) independent of what ran before it, so a resumed run repeats it exactly."""
    return (seed * 1_000_003 + epoch * 10_007 + rank) % 2**63


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Python, numpy and torch RNG states as tensors and numbers (loadable with weights_only=True)."""
    py = random.getstate()
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": torch.tensor(py[1], dtype=torch.int64), "python_gauss": py[2],
             "numpy": torch.from_numpy(keys.astype(np.int64)), "numpy_pos": int(pos),
             "numpy_has_gauss": int(has_gauss), "numpy_gauss": float(gauss), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict | None) -> None:
    if not state:
        return
    random.setstate((3, tuple(state["python"].tolist()), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
