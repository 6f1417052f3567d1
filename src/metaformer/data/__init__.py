"""Data for training and evaluation: folders, shards, Hugging Face datasets, the built-in digits,
transforms and loaders.

Sources (:func:`open_source` tells them apart from what is on disk):

* an ImageNet-layout folder ``ROOT/train/<class>/*`` and ``ROOT/val/<class>/*``, checked
  before anything trains (a ``val/`` without class folders silently gives ~0% accuracy);
* tar shards (webdataset layout, ``metaformer data pack``), streamed by :class:`ShardStream`:
  every sample exactly once per epoch across ranks and workers, the same batch count on every rank;
* a Hugging Face ``datasets`` folder (``save_to_disk`` or anything ``load_dataset`` reads);
* the built-in sets (``builtin:NAME``, :mod:`.builtin`), made from scikit-learn's 1,797 real 8x8
  handwritten-digit scans (no download): ``builtin:digits`` (one digit, upsampled bicubically to a
  small RGB size; the split is fixed: stratified, 20% val, ``random_state=0`` -> 1,437 train / 360
  val images) and ``builtin:odd-one-out`` (four digits, where is the odd one: a task that needs
  token mixing).

Unreadable images never crash a worker: a dataset returns an :class:`Unreadable` sentinel,
:func:`collate_skip_unreadable` takes it out of the batch, and the training loop decides
(skip and list, or stop under ``--strict-data``). Deciding in the main process keeps the
error message clean whatever the number of DataLoader workers.
"""
from .builtin import OddOneOut, builtin_name, eval_crop, is_builtin
from .digits import Digits
from .folders import SafeImageFolder, check_image_folder
from .hfds import HFImageDataset
from .images import DataError, Padding, Unreadable, list_images, open_rgb
from .loaders import PerSampleSeeds, ResumableDistributedSampler, UnreadableLog, collate_skip_unreadable, make_loader
from .shards import ShardStream, pack_image_folder
from .sources import DataSource, open_eval_source, open_source
from .transforms import train_transform

__all__ = ["DataError", "DataSource", "Digits", "HFImageDataset", "OddOneOut", "Padding", "PerSampleSeeds",
           "ResumableDistributedSampler", "SafeImageFolder", "ShardStream", "Unreadable", "UnreadableLog",
           "builtin_name", "check_image_folder", "eval_crop", "collate_skip_unreadable", "is_builtin", "list_images", "make_loader",
           "open_eval_source", "open_rgb", "open_source", "pack_image_folder", "train_transform"]
