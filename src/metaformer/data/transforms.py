"""The recipe's training augmentation (timm's ``create_transform``); the eval preprocessing belongs to the weights
(:func:`metaformer.zoo.eval_transform`)."""
from __future__ import annotations

from PIL import Image


def _posterize(img, bits_to_keep, **kwargs):
    # Keeping 0 bits (a black image) is what timm's RandAugment asks for at magnitude 10
    # ("inc1" with m9 +- noise reaches it); Pillow >= 12 rejects bits=0 and the run would crash.
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return _timm_posterize(img, bits_to_keep, **kwargs)


def _patch_timm_posterize() -> None:
    from timm.data import auto_augment

    global _timm_posterize
    if auto_augment.NAME_TO_OP["PosterizeIncreasing"] is not _posterize:
        _timm_posterize = auto_augment.posterize
        for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
            auto_augment.NAME_TO_OP[name] = _posterize


def train_transform(cfg, preprocessing: dict):
    """The recipe's augmentation, built by timm (RandAugment, random erasing, random-resized crop), normalised
    with the statistics of the weights' ``preprocessing`` (``mean``, ``std``)."""
    from timm.data import create_transform

    _patch_timm_posterize()
    return create_transform(
        input_size=cfg.img_size, is_training=True, scale=tuple(cfg.scale), hflip=cfg.hflip,
        color_jitter=cfg.color_jitter, auto_augment=None if cfg.aa in (None, "", "none") else cfg.aa,
        interpolation=cfg.train_interpolation, re_prob=cfg.reprob, re_mode=cfg.remode, re_count=cfg.recount, mean=tuple(preprocessing["mean"]),
        std=tuple(preprocessing["std"]))
