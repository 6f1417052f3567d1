"""The recipe's training augmentation (timm's ``create_transform``); the eval preprocessing belongs to the weights
(:func:`metaformer.zoo.eval_transform`)."""
from __future__ import annotations

from PIL import Image


def _posterize_to_zero_bits(img, bits_to_keep, **kwargs):
    # Keeping 0 bits (a black image) is what timm's RandAugment asks for at magnitude 10
    # ("inc1" with m9 +- noise reaches it); Pillow >= 12 rejects bits=0 and the run would crash.
    from timm.data.auto_augment import posterize

    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return posterize(img, bits_to_keep, **kwargs)


def augment_ops(transform) -> list:
    """timm's ``AugmentOp`` objects inside a transform built by ``create_transform`` (RandAugment's ops,
    AutoAugment's sub-policies, AugMix's ops)."""
    from timm.data.auto_augment import AugmentOp

    found, stack = [], [transform]
    while stack:
        t = stack.pop()
        if isinstance(t, AugmentOp):
            found.append(t)
        elif isinstance(t, (list, tuple)):
            stack.extend(t)
        else:
            stack.extend(getattr(t, attr) for attr in ("transforms", "ops", "policy") if hasattr(t, attr))
    return found


def train_transform(cfg, preprocessing: dict):
    """The recipe's augmentation, built by timm (RandAugment, random erasing, random-resized crop), normalised
    with the statistics of the weights' ``preprocessing`` (``mean``, ``std``)."""
    from timm.data import create_transform
    from timm.data.auto_augment import posterize

    transform = create_transform(
        input_size=cfg.img_size, is_training=True, scale=tuple(cfg.scale), ratio=tuple(cfg.ratio), hflip=cfg.hflip,
        color_jitter=cfg.color_jitter, auto_augment=None if cfg.aa in (None, "", "none") else cfg.aa,
        interpolation=cfg.train_interpolation, re_prob=cfg.reprob, re_mode=cfg.remode, re_count=cfg.recount,
        mean=tuple(preprocessing["mean"]), std=tuple(preprocessing["std"]))
    for op in augment_ops(transform):  # this transform's own ops; timm's tables stay as they are
        if op.aug_fn is posterize:
            op.aug_fn = _posterize_to_zero_bits
    return transform
