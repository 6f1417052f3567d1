"""A MetaFormer as a multi-scale backbone (``create_model(..., features_only=True)``).

The authors' detection and segmentation backbones (REFERENCE §2): the output of each stage
(strides 4/8/16/32, channels = ``dims``), each through its own new norm, no classifier. The
wrapper holds the network's stem and stages (their state-dict keys stay those of the
classifier, so an ImageNet checkpoint loads into it with only the head left out) and the new
norms under ``feature_norms``.
"""
from typing import Any, Dict, List, Sequence

import torch
from timm.models import FeatureInfo
from torch import nn

from ..errors import ConfigError
from .layers import eager, norm_factory
from .metaformer import MetaFormer, NormPoolHead, check_image_input


class MetaFormerFeatures(nn.Module):
    """One normed map per index in ``out_indices`` (stage ``i`` has stride ``4 * 2**i``).

    ``feature_info`` is timm's :class:`FeatureInfo`; ``config`` rebuilds it
    (``features_only``/``out_indices`` added to the network's config). The new norms are
    GroupNorm(1) for PoolFormer-style models (the authors' choice) and channel LayerNorm for the
    Baselines, unless the network's ``feature_norm`` says otherwise.
    """

    def __init__(self, model: MetaFormer, out_indices: Sequence[int] = (0, 1, 2, 3), output_fmt: str = "NCHW"):
        super().__init__()
        if output_fmt != "NCHW":
            raise ConfigError(f"MetaFormer backbones output NCHW maps, not {output_fmt}")
        n = model.num_stages
        try:
            self.out_indices = tuple(sorted({int(i) % n for i in out_indices}))
        except (TypeError, ValueError):
            raise ConfigError(f"out_indices must be stage indices (0..{n - 1}), got {out_indices!r}") from None
        if any(not -n <= int(i) < n for i in out_indices):
            raise ConfigError(f"out_indices {list(out_indices)} out of range for a {n}-stage model (0..{n - 1})")
        self.in_chans = model.in_chans
        self.num_stages = n
        self.img_size = model.img_size
        self.stem = model.stem
        self.stages = model.stages[:max(self.out_indices) + 1]  # later stages feed no output
        self.feature_info = FeatureInfo(model.feature_info, self.out_indices)
        spec = model.config.get("feature_norm") or ("mln" if isinstance(model.head, NormPoolHead) else "ln")
        self.feature_norms = nn.ModuleList(norm_factory(spec)(model.dims[i]) for i in self.out_indices)
        self.config: Dict[str, Any] = {**model.config, "features_only": True, "out_indices": list(self.out_indices)}
        cfg = {k: v for k, v in model.pretrained_cfg.items() if k not in ("num_classes", "classifier", "pool_size")}
        self.pretrained_cfg = self.default_cfg = cfg
        self.variant = getattr(model, "variant", None)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for s in self.stages:
            s.grad_checkpointing = enable

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        if not torch.jit.is_scripting():  # never compiled: eager calls only
            if eager():
                check_image_input(x, self.in_chans)
        x = self.stem(x)
        out = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.out_indices:
                out.append(x)
        return [norm(f) for norm, f in zip(self.feature_norms, out)]
