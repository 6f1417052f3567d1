"""Samplers and loaders: resumable distributed sampling, and batches that skip unreadable files."""
from __future__ import annotations

import contextlib
import itertools
import os
import random
import signal
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate

from .images import DataError, Padding, Unreadable


class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler`` (per-epoch shuffle, disjoint shards) that can start mid-epoch.

    ``set_epoch(epoch, start)`` skips the first ``start`` samples of this rank's shard, so a run
    interrupted mid-epoch continues with exactly the samples it had not seen yet.
    """

    start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self):
        indices = list(itertools.islice(super().__iter__(), self.start, None))
        log_dir = os.environ.get("METAFORMER_SAMPLE_LOG")  # audit aid: which samples each rank was given
        if log_dir:
            with open(Path(log_dir) / f"rank{self.rank}.txt", "a") as f:
                f.write(f"{self.epoch} " + " ".join(map(str, indices)) + "\n")
        return iter(indices)

    def __len__(self) -> int:
        return self.num_samples - self.start


@contextlib.contextmanager
def seeded(*key: int):
    """Inside, python's, numpy's and torch's (CPU) random draws depend on ``key`` alone; outside, the streams
    go on as if nothing had been drawn."""
    a, b = (int(v) for v in np.random.SeedSequence([int(k) % 2**64 for k in key]).generate_state(2))
    saved = random.getstate(), np.random.get_state(), torch.default_generator.get_state()
    random.seed(a << 32 | b)
    np.random.seed(a)
    torch.default_generator.manual_seed(a << 31 | b >> 1)  # CPU only: a GPU's stream is the model's
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.default_generator.set_state(saved[2])


class PerSampleSeeds(Dataset):
    """A map-style dataset whose samples draw their random augmentation from ``(seed, index)`` alone.

    Why: DataLoader workers each keep one random stream, so a sample's crop and flip would depend on
    which worker read it after how many others. Seeded per sample, an epoch's augmentation is the same
    for any number of workers, and a run resumed mid-epoch (which restarts the workers) draws exactly
    what an uninterrupted run draws. :meth:`set_seed` before each epoch (workers start afresh each epoch).
    """

    def __init__(self, dataset, seed: int = 0):
        self.dataset, self.seed = dataset, seed

    def set_seed(self, seed: int) -> None:
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        with seeded(self.seed, index):
            return self.dataset[index]


def collate_skip_unreadable(batch):
    """Default collate over the readable samples; returns ``(images, targets, unreadable)``.

    :class:`Padding` items are dropped silently: they are a shard stream's fillers, not samples.
    """
    good = [b for b in batch if not isinstance(b, (Unreadable, Padding))]
    bad = [b for b in batch if isinstance(b, Unreadable)]
    if good:
        x, y = default_collate(good)
    else:
        x, y = torch.empty(0), torch.empty(0, dtype=torch.long)
    return x, y, bad


def _worker_init(worker_id: int) -> None:
    # Ctrl-C and SIGTERM (sent to the whole process group, e.g. by a job scheduler) are the main process's to handle:
    # it finishes the step, saves and stops, shutting the workers down itself. A worker killed first would turn that
    # graceful stop into "DataLoader worker ... killed by signal". A worker still notices the main process dying.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_loader(dataset, batch_size: int, sampler, workers: int, drop_last: bool = False,
                generator: torch.Generator | None = None, pin_memory: bool = False,
                collate_fn=collate_skip_unreadable) -> DataLoader:
    """Batches ``(images, targets, unreadable)``; workers leave Ctrl-C and SIGTERM to the main process. Every
    DataLoader of the package is made here."""
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=drop_last,
                      collate_fn=collate_fn, worker_init_fn=_worker_init if workers else None,
                      generator=generator, pin_memory=pin_memory, persistent_workers=False)


class UnreadableLog:
    """Collects unreadable files per epoch; under ``strict`` the first one is an error naming it.

    Skipping is for the odd broken file. When the first :attr:`ALL_BAD_LIMIT` samples read are all
    unreadable, the data is in the wrong form (RGB label PNGs, another format): that is an error
    naming the first file, not a run that trains on nothing.
    """

    ALL_BAD_LIMIT = 10

    def __init__(self, strict: bool = False):
        self.strict = strict
        self.epoch: list[Unreadable] = []
        self.readable = self.unreadable = 0

    def add(self, bad: list[Unreadable], readable: int = 0) -> None:
        if bad and self.strict:
            raise DataError(f"unreadable image {bad[0].path} ({bad[0].error}); remove or replace it, "
                            f"or drop --strict-data to skip unreadable files")
        self.epoch.extend(bad)
        self.readable += readable
        self.unreadable += len(bad)
        if bad and self.readable == 0 and self.unreadable >= self.ALL_BAD_LIMIT:
            self._all_bad(bad[0])

    def _all_bad(self, first: Unreadable) -> None:
        raise DataError(f"the first {self.unreadable} images read were all unreadable, so the data is not in the "
                        f"expected form; the first: {first.error}")

    def end_epoch(self) -> list[Unreadable]:
        """This epoch's unreadable files (from every rank when distributed), and start afresh."""
        if self.epoch and self.readable == 0:
            self._all_bad(self.epoch[0])
        bad, self.epoch = self.epoch, []
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, bad)
            bad = [b for part in gathered for b in part]
        return sorted(set(bad))
