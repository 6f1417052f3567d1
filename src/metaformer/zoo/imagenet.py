"""The class names of the datasets the released weights were trained on."""
from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=None)
def imagenet_classes() -> tuple[list[str], list[str]]:
    """``(WordNet ids, short names)`` of ImageNet-1K in the standard order (sorted ids), shipped with the package."""
    from importlib.resources import files

    rows = [line.split("\t") for line in files(__package__).joinpath("imagenet_classes.tsv").read_text().splitlines()
            if line and not line.startswith("#")]
    return [r[0] for r in rows], [r[1] for r in rows]


@lru_cache(maxsize=None)
def imagenet22k_classes() -> tuple[list[str], list[str]]:
    """``(WordNet ids, names)`` of the 21,841 ImageNet-21K (fall 2011) classes of the authors' in21k heads,
    from timm's dataset info (the first lemma of each synset)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo("imagenet-22k")
    return list(info.label_names()), [d.split(",")[0] for d in info.label_descriptions()]


def categories(dataset: str) -> tuple[list[str], list[str]]:
    """``(names, WordNet ids)`` for ``imagenet-1k`` or ``imagenet-22k``."""
    wnids, names = imagenet_classes() if dataset == "imagenet-1k" else imagenet22k_classes()
    return names, wnids
