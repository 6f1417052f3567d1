"""Tar shards (the webdataset layout), read as a stream that shows every sample exactly once per epoch,
across ranks and DataLoader workers, with the same number of batches on every rank.

Layout, as :func:`pack_image_folder` writes it (``metaformer data pack``)::

    OUT/train-000000.tar ...   each sample: <key>.<png|jpg|...> (the source file's bytes) + <key>.cls (index)
    OUT/val-000000.tar ...
    OUT/classes.json           class names in index order
    OUT/_info.json             per split: shard file names and sample counts (timm's ReaderWds reads it too)

Why padding: shards are dealt out whole to the ``ranks x workers`` readers, so their sample counts differ.
A rank with fewer batches would leave the others waiting in DDP's gradient all-reduce forever, so each
reader tops its stream up with :class:`~metaformer.data.images.Padding` items to a bound that holds for
every epoch; the collate drops them, and no real sample is repeated or lost.
"""
from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import random
import tarfile
import warnings
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from torch.utils.data import IterableDataset, get_worker_info
from torchvision.datasets.folder import IMG_EXTENSIONS

from ..atomic import atomic_write, check_writable, clean_stale_temps
from ..errors import require
from .images import DataError, Padding, Unreadable, open_rgb
from .loaders import seeded

INFO, CLASSES = "_info.json", "classes.json"
SPLITS = ("train", "val")
# The extensions torchvision's ImageFolder reads, without the dot (a sample's keys): a packed file keeps its own.
IMAGE_EXTS = tuple(e.lstrip(".") for e in IMG_EXTENSIONS)
SHUFFLE_BUFFER = 2000  # samples (undecoded bytes) a training reader mixes; pack shuffles globally already
PADDING_WARN = 0.10  # warn when more than this share of a training epoch's items is padding


def _wds():
    return require("webdataset", "data", "reading tar shards")


# ----- finding shards -----

@dataclass
class Shards:
    """One split: shard files and how many samples each holds."""

    paths: list[str]
    lengths: list[int]

    @property
    def num_samples(self) -> int:
        return sum(self.lengths)


@dataclass
class ShardSet:
    """A shard source: its directory, class names, the splits found there, and the shards a pattern selected."""

    root: Path
    classes: list[str]
    splits: dict[str, Shards]
    selected: Shards | None = None  # the shards a brace/glob pattern named, when --data was one


def is_pattern(data: str) -> bool:
    return data.endswith(".tar") and any(c in data for c in "{*?[")


def looks_like_shards(data: str) -> bool:
    """A directory with ``_info.json`` or ``*.tar`` files, or a pattern of ``.tar`` files."""
    if is_pattern(data):
        return True
    d = Path(data)
    return d.is_dir() and ((d / INFO).is_file() or any(d.glob("*.tar")))


def count_samples(path: str | os.PathLike) -> int:
    """Samples in a tar shard, from its member names alone (a sample is the run of files sharing a key)."""
    base_plus_ext = _wds().tariterators.base_plus_ext
    count, last = 0, None
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                key, ext = base_plus_ext(member.name) if member.isreg() else (None, None)
                if key is not None and key != last and not os.path.basename(key).startswith("__"):
                    count, last = count + 1, key
    except (OSError, tarfile.TarError) as e:
        raise DataError(f"cannot read shard {path}: {type(e).__name__}: {e}; re-create it "
                        f"(metaformer data pack) or remove it") from None
    return count


def read_classes(root: Path) -> list[str]:
    f = root / CLASSES
    if not f.is_file():
        raise DataError(f"{root} has no {CLASSES}, so the shards' class names are unknown: write it (a JSON list of "
                        f"the class names in index order) or make the shards with `metaformer data pack`")
    try:
        classes = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {f}: {e}") from None
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) and c for c in classes)):
        raise DataError(f"{f} must hold a non-empty JSON list of class names in index order")
    if len(set(classes)) != len(classes):
        dup = sorted({c for c in classes if classes.count(c) > 1})
        raise DataError(f"{f} names a class twice ({', '.join(dup[:5])}); class names must be unique")
    return classes


def _inside(name) -> bool:
    """Whether a shard name from ``_info.json`` stays inside the shard folder (no absolute path, no ``..``)."""
    if not isinstance(name, str) or not name or os.path.isabs(name) or name.startswith(("/", "\\")):
        return False
    return ".." not in Path(name.replace("\\", "/")).parts


def _read_info(root: Path) -> dict[str, Shards] | None:
    f = root / INFO
    if not f.is_file():
        return None
    try:
        info = json.loads(f.read_text())
        splits = {}
        for name, s in info["splits"].items():
            outside = [n for n in s["filenames"] if not _inside(n)]
            if outside:
                raise DataError(f"{f} names shard {outside[0]!r}, which is not inside {root}: shard names must be "
                                f"relative to the shard folder, without '..'; correct {INFO} or re-create the shards")
            paths, lengths = [str(root / n) for n in s["filenames"]], [int(n) for n in s["shard_lengths"]]
            if len(paths) != len(lengths):
                raise ValueError(f"split {name}: {len(paths)} file names but {len(lengths)} shard lengths")
            splits[name] = Shards(paths, lengths)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"cannot read {f} ({type(e).__name__}: {e}); re-create the shards with "
                        f"`metaformer data pack` or delete {INFO} to count the samples from the shards") from None
    for s in splits.values():
        missing = [p for p in s.paths if not os.path.isfile(p)]
        if missing:
            raise DataError(f"{f} lists {len(missing)} shard(s) that do not exist, e.g. {missing[0]}; "
                            f"copy them back or re-create the shards")
    return splits


def _split_by_name(root: Path, split: str) -> Shards:
    paths = sorted(str(p) for p in root.glob(f"{split}-*.tar"))
    return Shards(paths, [count_samples(p) for p in paths])


def open_shards(data: str) -> ShardSet:
    """The shards of a directory (``train-*.tar``, ``val-*.tar``, ``classes.json``, optional ``_info.json``)
    or of a brace/glob pattern of ``.tar`` files, whose directory supplies ``classes.json`` and the val shards.

    Sample counts come from ``_info.json`` when it lists the shard, else from the shard's member names.
    """
    _wds()  # missing: one line now, not an error inside a DataLoader worker later
    paths = None
    if is_pattern(data):
        root = Path(os.path.dirname(data) or ".")
        if any(c in str(root) for c in "{*?["):
            raise DataError(f"--data {data}: only the file name of a shard pattern may hold braces or wildcards, "
                            f"not the directory, since classes.json and the val shards are looked up beside them")
        if not root.is_dir():
            raise DataError(f"shard directory {root} (from --data {data}) does not exist")
        if "{" in data:
            paths = _wds().shardlists.expand_urls(data)
            missing = [p for p in paths if not os.path.isfile(p)]
            if missing:
                raise DataError(f"--data {data} names {len(missing)} shard(s) that do not exist, e.g. {missing[0]}")
        else:
            paths = sorted(str(p) for p in root.glob(os.path.basename(data)))
            if not paths:
                raise DataError(f"no shard matches --data {data}")
    else:
        root = Path(data)
        if not root.is_dir():
            raise DataError(f"shard directory {root} does not exist")
    classes = read_classes(root)
    known = _read_info(root)
    splits = known if known is not None else {s: _split_by_name(root, s) for s in SPLITS}
    selected = None
    if paths is not None:
        counts = {os.path.basename(p): n for s in (known or {}).values() for p, n in zip(s.paths, s.lengths)}
        selected = Shards(paths, [counts.get(os.path.basename(p)) or count_samples(p) for p in paths])
    return ShardSet(root, classes, splits, selected)


# ----- reading -----

def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class ShardStream(IterableDataset):
    """Samples of tar shards, decoded in the DataLoader workers; items are ``(image, label)``, or
    :class:`Unreadable` for a sample that cannot be decoded, or :class:`Padding` (see :meth:`configure`).

    Each epoch the shards are permuted with ``(seed, epoch)`` (the same permutation on every rank) and dealt
    out whole to the ``world x workers`` readers by global reader id; a reader mixes its samples in a
    buffer of ``shuffle`` samples (0: shards in order, samples in order, for evaluation). Together they
    read every sample exactly once.
    """

    def __init__(self, shards: Shards, num_classes: int, transform=None, shuffle: int = 0, name: str = "shards"):
        if not shards.paths:
            raise DataError(f"{name}: no shards")
        self.shards, self.num_classes, self.transform, self.shuffle = shards, num_classes, transform, shuffle
        self.name = name
        self.target_transform = None  # e.g. a model's class index per class index (eval by class name)
        self.rank, self.world, self.batch_size, self.seed = 0, 1, 1, 0
        self.pad, self.workers, self.accum_steps = False, None, 1
        # Shared, so that persistent DataLoader workers see set_epoch() too.
        self._state = multiprocessing.RawArray("q", 2)  # [epoch, batches to skip]

    # --- planning (the same arithmetic in the main process and in every worker) ---

    def configure(self, rank: int, world: int, batch_size: int, seed: int, drop_last: bool, workers: int = 0,
                  accum_steps: int = 1) -> int:
        """Set this rank's place and batching; return its number of batches per epoch.

        ``drop_last=True`` (training): every rank yields the same number of batches, its readers padded with
        :class:`Padding` to a bound that holds for every epoch; the count is a multiple of ``accum_steps``
        so a loop stepping every ``accum_steps`` batches consumes them all. ``drop_last=False`` (evaluation):
        no padding, so the count is this rank's own and may differ between ranks. ``workers`` must be the
        DataLoader's ``num_workers``: the bound depends on how many readers share the shards.
        """
        if not (0 <= rank < world) or batch_size < 1 or workers < 0 or accum_steps < 1:
            raise ValueError(f"configure: rank {rank} of {world}, batch {batch_size}, workers {workers}, "
                             f"accum_steps {accum_steps}")
        self.rank, self.world, self.batch_size, self.seed = rank, world, batch_size, seed
        self.pad, self.workers, self.accum_steps = drop_last, workers, accum_steps
        if drop_last:
            share = self.padding_share()
            if share > PADDING_WARN:
                warnings.warn(f"{self.name}: {len(self.shards.paths)} shards over {world} rank(s) x "
                              f"{max(workers, 1)} reader(s): {share:.0%} of each epoch's items are padding. Write more, "
                              f"smaller shards (metaformer data pack --shard-size) or use fewer --workers",
                              stacklevel=2)
        return sum(self._batches_per_reader(self._epoch_state()[0]))

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Reshuffle for ``epoch``; skip the first ``skip_batches`` batches of this rank's epoch (mid-epoch
        resume: the skipped samples are the ones those batches held, none twice and none lost)."""
        self._state[0], self._state[1] = epoch, skip_batches

    def _epoch_state(self) -> tuple[int, int]:
        return int(self._state[0]), int(self._state[1])

    def __getstate__(self):
        state = dict(self.__dict__)
        if multiprocessing.context.get_spawning_popen() is None:  # a copy, not a worker starting: plain values
            state["_state"] = list(self._state)
        return state

    def _readers(self) -> int:
        return max(self.workers or 0, 1)

    def _assignment(self, epoch: int, readers: int) -> list[list[int]]:
        """Shard indices per global reader ``worker * world + rank``, identical on every rank. Dealing to the
        ranks in turn keeps them even when there are few shards (a small val split)."""
        order = list(range(len(self.shards.paths)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        total = self.world * readers
        return [order[g::total] for g in range(total)]

    def _quota(self, readers: int) -> int:
        """Items (samples + padding) per reader when padded: an epoch-independent bound on any reader's
        samples (a reader gets at most ceil(shards / (world x readers)) shards: the largest ones), in whole
        batches. ``readers`` is the number per rank (DataLoader workers, at least 1)."""
        most = math.ceil(len(self.shards.paths) / (self.world * readers))
        batches = math.ceil(sum(sorted(self.shards.lengths, reverse=True)[:most]) / self.batch_size)
        step = self.accum_steps // math.gcd(readers, self.accum_steps)  # readers * batches % accum_steps == 0
        return _round_up(max(batches, 1), step) * self.batch_size

    def _items_per_reader(self, epoch: int, readers: int) -> list[int]:
        """This rank's readers' item counts for ``epoch``."""
        if self.pad:
            return [self._quota(readers)] * readers
        plan = self._assignment(epoch, readers)
        return [sum(self.shards.lengths[i] for i in plan[w * self.world + self.rank]) for w in range(readers)]

    def _batches_per_reader(self, epoch: int) -> list[int]:
        return [math.ceil(n / self.batch_size) for n in self._items_per_reader(epoch, self._readers())]

    @staticmethod
    def _consumed(batches: list[int], skip: int) -> list[int]:
        """Batches each worker had delivered after the rank's first ``skip``: the DataLoader takes one batch
        from each worker in turn, passing over the workers that have finished."""
        done = [0] * len(batches)
        while skip > 0 and any(d < b for d, b in zip(done, batches)):
            for w in range(len(batches)):
                if skip and done[w] < batches[w]:
                    done[w], skip = done[w] + 1, skip - 1
        return done

    def padding_share(self) -> float:
        """The share of padding among an epoch's items (0 unless configured with ``drop_last=True``)."""
        if not self.pad:
            return 0.0
        total = self._quota(self._readers()) * self._readers() * self.world
        return 1 - self.shards.num_samples / total

    def __len__(self) -> int:
        """This rank's items this epoch (padding included), less the skipped batches' share."""
        epoch, skip = self._epoch_state()
        items = self._items_per_reader(epoch, self._readers())
        batches = [math.ceil(n / self.batch_size) for n in items]
        done = self._consumed(batches, skip)
        return sum(max(n - d * self.batch_size, 0) for n, d in zip(items, done))

    # --- iterating (inside each DataLoader worker) ---

    def __iter__(self):
        info = get_worker_info()
        worker, readers = (info.id, info.num_workers) if info else (0, 1)
        if self.pad and readers != self._readers():
            raise DataError(f"{self.name}: configured for {self.workers or 0} DataLoader worker(s) but read with "
                            f"{info.num_workers if info else 0}: pass the loader's num_workers to configure()")
        epoch, skip = self._epoch_state()
        reader = worker * self.world + self.rank
        mine = self._assignment(epoch, readers)[reader]
        items = self._items_per_reader(epoch, readers)
        done = self._consumed([math.ceil(n / self.batch_size) for n in items], skip)[worker]
        stream = self._padded(self._raw(mine), items[worker] if self.pad else None, reader)
        if self.shuffle:  # seeded per (epoch, reader): a resumed epoch replays the same order, then skips
            rng = random.Random((self.seed * 1_000_003 + epoch) * 65_537 + reader)
            stream = _wds().shuffle(self.shuffle, initial=self.shuffle, rng=rng)(stream)
        log = _SampleLog(self.rank, worker, epoch)
        try:
            for raw in islice(stream, done * self.batch_size, None):
                if isinstance(raw, (Padding, Unreadable)):
                    yield raw
                    continue
                log.keys.append(raw["__key__"])
                yield self._decode(raw)
        finally:
            log.write()

    def _raw(self, shard_ids: list[int]):
        """Undecoded samples of these shards; a shard that breaks off yields one :class:`Unreadable` for
        its remaining samples. A shard never yields more samples than counted, so the padding bound holds."""
        wds = _wds()
        for i in shard_ids:
            path, expected = self.shards.paths[i], self.shards.lengths[i]
            name = os.path.basename(path)
            samples, n = wds.tarfile_samples([{"url": path}]), 0
            while True:
                try:
                    sample = next(samples)
                except StopIteration:
                    if n < expected:  # tarfile ends some truncated archives without an error
                        yield Unreadable(path, f"shard {name} ends after {n} of its {expected} samples; re-create it")
                    break
                except Exception as e:  # a truncated or corrupt tar: whatever tarfile or gopen raise
                    why = str(e.args[0]).split(" @ ")[0] if e.args else ""
                    yield Unreadable(path, f"shard {name} breaks off after {n} of its {expected} samples "
                                           f"({type(e).__name__}: {why}); re-create it")
                    break
                if n == expected:
                    warnings.warn(f"{path} holds more samples than the {expected} recorded for it; the rest were "
                                  f"not read: re-create the shards or correct {INFO}")
                    break
                sample["__key__"] = f"{name}:{sample['__key__']}"
                n += 1
                yield sample

    def _padded(self, raw, quota: int | None, reader: int):
        n = 0
        for sample in raw:
            n += 1
            yield sample
        for _ in range((quota or 0) - n):
            yield Padding(reader)

    def _decode(self, sample: dict):
        key = sample["__key__"]
        try:
            ext = next((e for e in IMAGE_EXTS if e in sample), None)
            if ext is None:
                raise DataError(f"{key}: no image file in the sample (extensions {', '.join(IMAGE_EXTS)})")
            if "cls" not in sample:
                raise DataError(f"{key}: no .cls (class index) file in the sample")
            try:
                label = int(sample["cls"].decode().strip())
            except ValueError:
                raise DataError(f"{key}: its .cls holds {sample['cls'][:20]!r}, not a class index") from None
            if not 0 <= label < self.num_classes:
                raise DataError(f"{key}: class index {label} is outside the {self.num_classes} classes")
            img = open_rgb(sample[ext], f"{key}.{ext}")
        except DataError as e:
            return Unreadable(key, str(e))
        if self.target_transform is not None:
            label = self.target_transform(label)
        if self.transform is None:
            return img, label
        if not self.shuffle:
            return self.transform(img), label
        # Training: the augmentation is seeded by the sample, so it does not depend on the reader (worker) that
        # reads it, and a resumed epoch draws exactly what an uninterrupted one draws.
        with seeded(self.seed, self._epoch_state()[0], int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8)
                                                                      .digest(), "little")):
            return self.transform(img), label


class _SampleLog:
    """Audit aid, as the distributed sampler's: with ``METAFORMER_SAMPLE_LOG=DIR`` each reader appends
    ``epoch key key ...`` (the samples it delivered) to ``DIR/rank<r>.worker<w>.txt``."""

    def __init__(self, rank: int, worker: int, epoch: int):
        self.dir = os.environ.get("METAFORMER_SAMPLE_LOG")
        self.path = Path(self.dir or ".") / f"rank{rank}.worker{worker}.txt"
        self.epoch, self.keys = epoch, []

    def write(self) -> None:
        if self.dir:
            with open(self.path, "a") as f:
                f.write(f"{self.epoch} " + " ".join(self.keys) + "\n")


# ----- writing -----

def pack_image_folder(root: str | os.PathLike, out: str | os.PathLike, shard_size: int, overwrite: bool = False,
                      seed: int = 0, progress=None) -> dict:
    """Write an ImageFolder root (``ROOT/train/<class>/*``, ``ROOT/val/<class>/*``) as tar shards.

    Files are stored as they are (no re-encoding), the train split in a seeded random order (shards of one
    class each would defeat the reader's shuffling), val in folder order. Each shard is written to a temp
    file and renamed, and ``_info.json`` last: a killed pack leaves no half shard and no valid-looking set.
    Returns the ``_info.json`` contents.
    """
    from .folders import SafeImageFolder, check_image_folder

    wds = _wds()
    if shard_size < 1:
        raise DataError(f"--shard-size must be at least 1, not {shard_size}")
    train_dir, val_dir, classes = check_image_folder(root)
    out = Path(out)
    for split_dir in (train_dir, val_dir):
        if out.resolve() == split_dir.resolve() or split_dir.resolve() in out.resolve().parents:
            raise DataError(f"{out} is inside {split_dir}, so it would be read as (part of) a class of the data it "
                            f"packs: write the shards outside {root}/train and {root}/val")
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} exists and is not a directory")
    check_writable(out, f"OUT {out}", folder=True)
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise DataError(f"{out} is not empty; choose a new folder or pass --overwrite to replace its shards")
        (out / INFO).unlink(missing_ok=True)  # first: an interrupted overwrite must not look complete
    out.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(out)
    info = {"name": Path(root).resolve().name, "source": str(Path(root).resolve()), "classes": CLASSES,
            "splits": {}}
    for split, folder in (("train", train_dir), ("val", val_dir)):
        samples = list(SafeImageFolder(folder, allow_empty=split == "val").samples)  # as training reads them
        if not samples:
            raise DataError(f"{folder} has no images; nothing to pack")
        if split == "train":
            random.Random(seed).shuffle(samples)
        names, lengths = [], []
        for start in range(0, len(samples), shard_size):
            chunk = samples[start:start + shard_size]
            name = f"{split}-{len(names):06d}.tar"

            def write(f, chunk=chunk, start=start):
                with wds.TarWriter(f, encoder=False, mtime=0) as sink:  # mtime fixed: the same input, the same bytes
                    for i, (path, label) in enumerate(chunk, start):
                        ext = os.path.splitext(path)[1][1:].lower()
                        sink.write({"__key__": f"{i:08d}", ext: Path(path).read_bytes(), "cls": str(label).encode()})

            atomic_write(out / name, write)
            names.append(name)
            lengths.append(len(chunk))
            if progress:
                progress(split, name, len(chunk))
        info["splits"][split] = {"name": split, "num_samples": len(samples), "filenames": names,
                                 "shard_lengths": lengths}
    stale = {p.name for p in out.glob("*-*.tar") if p.name.split("-")[0] in SPLITS} - \
        {n for s in info["splits"].values() for n in s["filenames"]}
    for name in sorted(stale):  # shards of an earlier, larger pack
        (out / name).unlink()
    atomic_write(out / CLASSES, lambda f: f.write(json.dumps(classes, indent=1).encode()))
    atomic_write(out / INFO, lambda f: f.write(json.dumps(info, indent=1).encode()))
    return info
