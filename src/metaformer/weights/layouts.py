"""Checkpoint key layouts: which one a file uses, and the conversion to ours and back.

Ours are timm's key names (``stem.conv``, ``stem.norm``, ``stages.{i}.downsample.{norm,conv}``,
``stages.{i}.blocks.{j}.*``, ``head.norm``, ``head.fc`` or ``head.fc.{fc1,norm,fc2}``), with
every pointwise layer a 1x1 conv. The layouts read and written:

- ``authors``: PoolFormer's release (``patch_embed.proj``, ``network.{k}.{j}.*``, ``norm``,
  ``head``). ``network`` is one flat list: block lists, downsampling convs and, in the
  attention hybrids, a position embedding entry right before its stage's blocks, which shifts
  the indices of everything after it. The mapping is therefore read off the file's own
  entries (a block list has ``{k}.{j}.`` keys, a downsampler ``{k}.proj``, a position
  embedding ``{k}.pos_embed``), for any depth and any hybrid. The authors' ``SpatialFc``
  weight (``token_mixer.fc``, ``[N, N]``, or ``[N, N, 1]`` stored as a Conv1d) is our
  ``token_mixer.proj``.
- ``authors_v2``: the MetaFormer Baselines' release (``downsample_layers.{i}.{pre_norm,conv,
  post_norm}``, ``stages.{i}.{j}.*`` with ``nn.Linear`` pointwise layers, ``norm``, ``head`` or
  ``head.{fc1,norm,fc2}``). Note ``head.norm`` there is the MLP head's own ``[4C]`` norm, where
  timm's (and our) ``head.norm`` is the ``[C]`` norm before the head: the two layouts cannot be
  loaded into each other by name, which is the size mismatch users report.
- ``timm``: our names. timm's CAFormer keeps the MLP of its attention stages as ``nn.Linear``
  (``[4C, C]``), where ours are 1x1 convs; loading reshapes (see ``load``), writing squeezes.
- ``huggingface``: transformers' PoolFormer (``poolformer.encoder.patch_embeddings.{i}.projection``,
  ``encoder.block.{i}.{j}.*`` with ``before_norm``/``after_norm``/``output.conv1``/``conv2``,
  top-level ``norm`` and ``classifier``). PoolFormer v1 only: transformers has no other family.
- ``metaformer``: our safetensors (:func:`metaformer.weights.save_weights`), recognised by its
  metadata, which also holds the config that rebuilds the model.
"""
from __future__ import annotations

import re
from typing import Iterable

import torch

from .io import WeightsError

FORMAT_NAME = "metaformer"
LAYOUTS = ("authors", "authors_v2", "timm", "huggingface", "metaformer")


def detect_layout(keys: Iterable[str], metadata: dict[str, str] | None = None) -> str | None:
    """One of :data:`LAYOUTS`, or ``None`` when unknown."""
    if (metadata or {}).get("format") == FORMAT_NAME:
        return "metaformer"
    keys = list(keys)

    def has(prefix):
        return any(k.startswith(prefix) for k in keys)

    if has("network.") or has("patch_embed.proj."):
        return "authors"
    if has("downsample_layers."):
        return "authors_v2"
    if has("poolformer.encoder.") or has("encoder.patch_embeddings.") or has("encoder.block."):
        return "huggingface"
    if has("stem.conv.") or has("stages."):
        return "timm"
    return None


def _rename(rest: str, table: dict[str, str]) -> str:
    """Replace the longest leading dotted component sequence of ``rest`` found in ``table``."""
    for old in sorted(table, key=len, reverse=True):
        if rest == old or rest.startswith(old + "."):
            return table[old] + rest[len(old):]
    return rest


def _invert(table: dict[str, str]) -> dict[str, str]:
    return {v: k for k, v in table.items()}


# Inside one block: the authors' PoolFormer names -> ours (unlisted names are the same in both).
AUTHORS_BLOCK = {
    "layer_scale_1": "layer_scale1.scale",
    "layer_scale_2": "layer_scale2.scale",
    "token_mixer.fc": "token_mixer.proj",  # SpatialFc
}
AUTHORS_TOP = {"patch_embed.proj": "stem.conv", "norm": "head.norm", "head": "head.fc"}

# The Baselines' release -> ours.
AUTHORS_V2_HEAD = {"norm": "head.norm", "head.fc1": "head.fc.fc1", "head.norm": "head.fc.norm",
                   "head.fc2": "head.fc.fc2", "head": "head.fc"}
# Pointwise layers the Baselines wrote as nn.Linear ([out, in]) and we hold as 1x1 convs.
POINTWISE = ("mlp.fc1.weight", "mlp.fc2.weight", "token_mixer.pwconv1.weight", "token_mixer.pwconv2.weight")

HF_BLOCK = {
    "before_norm": "norm1",
    "after_norm": "norm2",
    "output.conv1": "mlp.fc1",
    "output.conv2": "mlp.fc2",
    "layer_scale_1": "layer_scale1.scale",
    "layer_scale_2": "layer_scale2.scale",
}
HF_TOP = {"norm": "head.norm", "classifier": "head.fc"}

_BLOCK = re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.(.+)$")


# ----------------------------------------------------------------------------------------- to ours

def _authors_network_map(keys: Iterable[str]) -> dict[int, tuple[str, int]]:
    """``network`` index -> (``blocks``/``downsample``/``pos_embed``, our stage index), read off the file."""
    kinds: dict[int, str] = {}
    for key in keys:
        parts = key.split(".")
        if parts[0] != "network" or len(parts) < 3 or not parts[1].isdigit():
            continue
        k = int(parts[1])
        kinds[k] = "blocks" if parts[2].isdigit() else "pos_embed" if parts[2] == "pos_embed" else "downsample"
    # A downsampler or a position embedding belongs to the stage whose block list follows it.
    mapping, stage = {}, 0
    for k in sorted(kinds):
        mapping[k] = (kinds[k], stage)
        stage += kinds[k] == "blocks"
    return mapping


def _from_authors(sd: dict[str, torch.Tensor]) -> dict[str, tuple[str, torch.Tensor]]:
    network = _authors_network_map(sd)
    out = {}
    for key, value in sd.items():
        new = _rename(key, AUTHORS_TOP)
        parts = key.split(".")
        if parts[0] == "network" and len(parts) >= 3 and parts[1].isdigit():
            kind, stage = network[int(parts[1])]
            rest = ".".join(parts[2:])
            if kind == "blocks":
                j, rest = rest.split(".", 1)
                new = f"stages.{stage}.blocks.{j}.{_rename(rest, AUTHORS_BLOCK)}"
                if rest.startswith("token_mixer.fc.") and value.ndim == 3 and value.shape[-1] == 1:
                    value = value[..., 0]  # Conv1d(N, N, 1) -> Linear(N, N)
            elif kind == "pos_embed":
                new = f"stages.{stage}.pos_embed.pos"
            elif rest.startswith("proj."):
                new = f"stages.{stage}.downsample.conv.{rest[len('proj.'):]}"
        out[new] = (key, value)
    return out


def _from_authors_v2(sd: dict[str, torch.Tensor]) -> dict[str, tuple[str, torch.Tensor]]:
    out = {}
    for key, value in sd.items():
        parts = key.split(".")
        new = _rename(key, AUTHORS_V2_HEAD)
        if parts[0] == "downsample_layers" and len(parts) >= 4:
            i, part, rest = int(parts[1]), parts[2], ".".join(parts[3:])
            if i == 0:
                new = f"stem.{'norm' if part == 'post_norm' else part}.{rest}"
            else:
                new = f"stages.{i}.downsample.{'norm' if part == 'pre_norm' else part}.{rest}"
        elif parts[0] == "stages" and len(parts) >= 4 and parts[2].isdigit():
            new = f"stages.{parts[1]}.blocks.{parts[2]}.{'.'.join(parts[3:])}"
        out[new] = (key, value)
    return out


def _from_huggingface(sd: dict[str, torch.Tensor]) -> dict[str, tuple[str, torch.Tensor]]:
    out = {}
    for key, value in sd.items():
        rest = key[len("poolformer."):] if key.startswith("poolformer.") else key
        parts = rest.split(".")
        new = _rename(rest, HF_TOP)
        if parts[:2] == ["encoder", "patch_embeddings"] and len(parts) > 4 and parts[3] == "projection":
            i = int(parts[2])
            target = "stem.conv" if i == 0 else f"stages.{i}.downsample.conv"
            new = ".".join([target] + parts[4:])
        elif parts[:2] == ["encoder", "block"] and len(parts) > 4:
            i, j = parts[2], parts[3]
            new = f"stages.{i}.blocks.{j}.{_rename('.'.join(parts[4:]), HF_BLOCK)}"
        out[new] = (key, value)
    return out


def to_ours(sd: dict[str, torch.Tensor], layout: str) -> dict[str, tuple[str, torch.Tensor]]:
    """Our key -> (the file's key, tensor). Shapes are fitted on loading (``load``)."""
    if layout == "authors":
        return _from_authors(sd)
    if layout == "authors_v2":
        return _from_authors_v2(sd)
    if layout == "huggingface":
        return _from_huggingface(sd)
    return {k: (k, v) for k, v in sd.items()}  # timm and ours share the key names


# ----------------------------------------------------------------------------------------- from ours

def _stages(sd: dict[str, torch.Tensor]) -> int:
    return 1 + max(int(m.group(1)) for k in sd if (m := _BLOCK.match(k)))


def _to_authors(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if "stem.norm.weight" in sd:
        raise WeightsError("the 'authors' layout is PoolFormer v1's: this model has a stem norm (a MetaFormer "
                           "Baselines model); write it with --to authors_v2")
    n = _stages(sd)
    index, k = {}, 0  # our (stage, part) -> the authors' flat network index
    for i in range(n):
        if i > 0:
            index[(i, "downsample")], k = k, k + 1
        if f"stages.{i}.pos_embed.pos" in sd:
            index[(i, "pos_embed")], k = k, k + 1
        index[(i, "blocks")], k = k, k + 1
    block = _invert(AUTHORS_BLOCK)
    out = {}
    for key, value in sd.items():
        m = _BLOCK.match(key)
        if m:
            i, j, rest = int(m.group(1)), m.group(2), m.group(3)
            out[f"network.{index[(i, 'blocks')]}.{j}.{_rename(rest, block)}"] = value
        elif (m := re.match(r"^stages\.(\d+)\.downsample\.conv\.(.+)$", key)):
            out[f"network.{index[(int(m.group(1)), 'downsample')]}.proj.{m.group(2)}"] = value
        elif (m := re.match(r"^stages\.(\d+)\.pos_embed\.pos$", key)):
            out[f"network.{index[(int(m.group(1)), 'pos_embed')]}.pos_embed"] = value
        else:
            out[_rename(key, _invert(AUTHORS_TOP))] = value
    return out


def _squeeze(value: torch.Tensor) -> torch.Tensor:
    return value.reshape(value.shape[:2]) if value.ndim == 4 and value.shape[2:] == (1, 1) else value


def _to_authors_v2(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if "stem.norm.weight" not in sd:
        raise WeightsError("the 'authors_v2' layout is the MetaFormer Baselines': this model has no stem norm (a "
                           "PoolFormer v1 model); write it with --to authors")
    head = _invert(AUTHORS_V2_HEAD)
    out = {}
    for key, value in sd.items():
        m = _BLOCK.match(key)
        if m:
            rest = m.group(3)
            out[f"stages.{m.group(1)}.{m.group(2)}.{rest}"] = _squeeze(value) if rest.endswith(POINTWISE) else value
        elif key.startswith("stem."):
            part, rest = key.split(".", 2)[1:]
            out[f"downsample_layers.0.{'post_norm' if part == 'norm' else part}.{rest}"] = value
        elif (m := re.match(r"^stages\.(\d+)\.downsample\.(norm|conv)\.(.+)$", key)):
            part = "pre_norm" if m.group(2) == "norm" else "conv"
            out[f"downsample_layers.{m.group(1)}.{part}.{m.group(3)}"] = value
        else:
            out[_rename(key, head)] = value
    return out


def _to_timm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # timm's CAFormer runs its attention stages on [B, N, C] tokens, with Linear MLPs there.
    attention = {int(m.group(1)) for k in sd if (m := _BLOCK.match(k)) and m.group(3).startswith("token_mixer.qkv.")}
    out = {}
    for key, value in sd.items():
        m = _BLOCK.match(key)
        squeeze = m and int(m.group(1)) in attention and m.group(3) in ("mlp.fc1.weight", "mlp.fc2.weight")
        out[key] = _squeeze(value) if squeeze else value
    return out


def _to_huggingface(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if "stem.norm.weight" in sd or any(".token_mixer." in k for k in sd) or "head.fc.fc1.weight" in sd:
        raise WeightsError("transformers has PoolFormer v1 only (pooling, GroupNorm(1), LayerScale); this model is "
                           "another MetaFormer, which transformers cannot load")
    block = _invert(HF_BLOCK)
    out = {}
    for key, value in sd.items():
        m = _BLOCK.match(key)
        if m:
            out[f"poolformer.encoder.block.{m.group(1)}.{m.group(2)}.{_rename(m.group(3), block)}"] = value
        elif key.startswith("stem.conv."):
            out["poolformer.encoder.patch_embeddings.0.projection." + key[len("stem.conv."):]] = value
        elif (m := re.match(r"^stages\.(\d+)\.downsample\.conv\.(.+)$", key)):
            out[f"poolformer.encoder.patch_embeddings.{m.group(1)}.projection.{m.group(2)}"] = value
        else:
            out[_rename(key, _invert(HF_TOP))] = value
    return out


def from_ours(sd: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """Our state dict in another layout (``authors``, ``authors_v2``, ``timm``, ``huggingface``)."""
    writers = {"authors": _to_authors, "authors_v2": _to_authors_v2, "timm": _to_timm,
               "huggingface": _to_huggingface}
    if layout not in writers:
        raise WeightsError(f"cannot write the {layout!r} layout; choose one of {', '.join(writers)}")
    return writers[layout](sd)
