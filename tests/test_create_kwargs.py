"""timm's creation arguments, with timm's meaning, through both entry points (``metaformer.create_model`` and
``timm.create_model('metaformer_*')``) for one model of every family: features_only with every feature_cls
and out_indices (also given in feature_cfg), output_stride, pretrained_cfg as a tag or a dict,
pretrained_cfg_overlay (preprocessing and weight sources), checkpoint_path, cache_dir, and
scriptable/exportable/no_jit while the model is built.

Every feature output is compared with the same network's own stage outputs (``forward_intermediates``),
so a wrapper that returned the wrong stages, or skipped the per-stage norms, fails."""
import pytest
import timm
import torch
from timm.layers import is_exportable, is_no_jit, is_scriptable
from timm.models import FeatureDictNet, FeatureGraphNet, FeatureHookNet, FeatureListNet
from timm.models._features import FeatureGetterNet

import metaformer
from metaformer.errors import ConfigError
from metaformer.models import MetaFormerFeatures

FAMILIES = ["poolformer_s12", "metaformer_ppaa_s12", "identityformer_s12", "randformer_s12", "poolformerv2_s12",
            "convformer_s18", "caformer_s18"]
# one block per stage, narrow, built for the 64 px input (RandFormer's mixing is sized for its grid)
SMALL = dict(depths=[1, 1, 1, 1], dims=[32, 64, 96, 128], img_size=64)
ENTRIES = {"metaformer": lambda name, **kw: metaformer.create_model(name, **kw),
           "timm": lambda name, **kw: timm.create_model(metaformer.zoo.timm_name(name), **kw)}
WRAPPERS = {"list": FeatureListNet, "dict": FeatureDictNet, "hook": FeatureHookNet, "fx": FeatureGraphNet,
            "getter": FeatureGetterNet}


def x64():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def build(entry, name, seed=0, **kwargs):
    torch.manual_seed(seed)
    return ENTRIES[entry](name, **SMALL, **kwargs).eval()


def stage_outputs(entry, name, indices):
    """The raw outputs of stages ``indices`` of the classifier with the same weights (same seed)."""
    with torch.no_grad():
        return build(entry, name).forward_intermediates(x64(), indices=list(indices), intermediates_only=True)


def as_list(out):
    return list(out.values()) if isinstance(out, dict) else list(out)


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("name", FAMILIES)
def test_features_only_default_is_the_normed_backbone(entry, name):
    model = build(entry, name, features_only=True, out_indices=(0, 2, 3))
    assert isinstance(model, MetaFormerFeatures)
    assert model.feature_info.channels() == [32, 96, 128] and model.feature_info.reduction() == [4, 16, 32]
    with torch.no_grad():
        outs = model(x64())
        expected = [norm(f) for norm, f in zip(model.feature_norms, stage_outputs(entry, name, (0, 2, 3)))]
    assert len(outs) == 3
    for out, want in zip(outs, expected):
        torch.testing.assert_close(out, want)
    assert "num_classes" not in model.pretrained_cfg


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("feature_cls", WRAPPERS)
def test_timm_feature_classes_give_the_raw_stage_outputs(entry, name, feature_cls):
    """As timm: each wrapper returns the stages' own outputs (no new norms), for the requested indices."""
    model = build(entry, name, features_only=True, feature_cls=feature_cls, out_indices=(1, 3))
    assert type(model) is WRAPPERS[feature_cls]
    assert model.feature_info.channels() == [64, 128] and model.feature_info.reduction() == [8, 32]
    with torch.no_grad():
        outs = as_list(model(x64()))
    expected = stage_outputs(entry, name, (1, 3))
    assert len(outs) == 2
    for out, want in zip(outs, expected):
        torch.testing.assert_close(out, want)
    assert "num_classes" not in model.pretrained_cfg and model.pretrained_cfg["first_conv"] == "stem.conv"


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("name", FAMILIES)
def test_feature_cfg_carries_the_class_and_indices(entry, name):
    """timm's own test passes ``feature_cfg={"feature_cls": "fx"}``; direct arguments win over feature_cfg's."""
    model = build(entry, name, features_only=True, feature_cfg={"feature_cls": "fx", "out_indices": (0, 2)})
    assert isinstance(model, FeatureGraphNet) and model.feature_info.channels() == [32, 96]
    model = build(entry, name, features_only=True, feature_cls="getter", out_indices=(3,),
                  feature_cfg={"feature_cls": "fx", "out_indices": (0, 2)})
    assert isinstance(model, FeatureGetterNet) and model.feature_info.channels() == [128]
    with torch.no_grad():
        torch.testing.assert_close(model(x64())[0], stage_outputs(entry, name, (3,))[0])


@pytest.mark.parametrize("entry", ENTRIES)
def test_fx_features_script(entry):
    with timm.layers.set_scriptable(True):
        model = build(entry, "poolformer_s12", features_only=True, feature_cfg={"feature_cls": "fx"})
    scripted = torch.jit.script(model)
    with torch.no_grad():
        for out, want in zip(scripted(x64()), model(x64())):
            torch.testing.assert_close(out, want)


@pytest.mark.parametrize("entry", ENTRIES)
def test_bad_feature_arguments_are_one_clear_error(entry):
    with pytest.raises(ConfigError, match="unknown feature_cls 'nope'.*'dict', 'fx', 'getter', 'hook', 'list'"):
        build(entry, "poolformer_s12", features_only=True, feature_cls="nope")
    with pytest.raises(ConfigError, match="pass features_only=True"):
        build(entry, "poolformer_s12", out_indices=(1, 2))


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("name", FAMILIES)
def test_output_stride_32_or_a_clear_error(entry, name):
    assert build(entry, name, output_stride=32)(x64()).shape == (2, 1000)
    with pytest.raises(ConfigError, match=r"output_stride=16: .* only 32 is possible"):
        build(entry, name, output_stride=16)


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("name", FAMILIES)
def test_pretrained_cfg_tag_dict_and_overlay(entry, name, tmp_path):
    tags = metaformer.get_model_info(name).weights
    if tags:  # a tag given as pretrained_cfg: that tag's preprocessing (the last tag differs most)
        tag = tags[-1]
        with torch.device("meta"):  # built at the tag's own size, to see the whole cfg: shapes only
            cfg = ENTRIES[entry](name, pretrained_cfg=tag.tag).pretrained_cfg
        assert cfg["input_size"][1:] == (tag.img_size, tag.img_size) and cfg["crop_pct"] == tag.crop_pct
        assert cfg["num_classes"] == tag.num_classes
    source = build(entry, name, seed=7)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    # the overlay's file is where pretrained=True reads; its other entries describe the preprocessing
    model = build(entry, name, pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "w.pth"),
                                                                            crop_pct=0.5, interpolation="bilinear"))
    assert model.pretrained_cfg["crop_pct"] == 0.5 and model.pretrained_cfg["interpolation"] == "bilinear"
    for k, v in source.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    # a whole cfg as a dict, as timm takes it
    model = build(entry, name, pretrained=True, pretrained_cfg=dict(file=str(tmp_path / "w.pth"), crop_pct=0.6,
                                                                    num_classes=1000))
    assert model.pretrained_cfg["crop_pct"] == 0.6
    assert torch.equal(model.stem.conv.weight, source.stem.conv.weight)


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("name", FAMILIES)
def test_checkpoint_path_loads_after_building(entry, name, tmp_path):
    source = build(entry, name, seed=3, num_classes=7)
    torch.save({"state_dict": source.state_dict()}, tmp_path / "ckpt.pth")
    model = build(entry, name, num_classes=7, checkpoint_path=str(tmp_path / "ckpt.pth"))
    with torch.no_grad():
        assert torch.equal(model(x64()), source(x64()))
    with pytest.raises((RuntimeError, metaformer.WeightsError), match="size mismatch"):  # strict, as timm's
        build(entry, name, num_classes=5, checkpoint_path=str(tmp_path / "ckpt.pth"))


@pytest.mark.parametrize("entry", ENTRIES)
def test_a_url_source_downloads_into_cache_dir(entry, tmp_path):
    source = build(entry, "poolformerv2_s12", seed=5)
    torch.save(source.state_dict(), tmp_path / "remote.pth")
    cache = tmp_path / "cache"
    model = build(entry, "poolformerv2_s12", pretrained=True, cache_dir=str(cache),
                  pretrained_cfg_overlay=dict(url=(tmp_path / "remote.pth").as_uri(), hf_hub_id=None))
    assert torch.equal(model.stem.conv.weight, source.stem.conv.weight)
    assert [p.name for p in cache.rglob("remote.pth")] == ["remote.pth"]


class LayerConfigSpy(torch.nn.Identity):
    """A token mixer that records timm's layer config at the moment the network builds it."""
    seen: list = []

    def __init__(self, dim: int):
        super().__init__()
        LayerConfigSpy.seen.append((is_scriptable(), is_exportable(), is_no_jit()))


@pytest.mark.parametrize("entry", ENTRIES)
def test_scriptable_exportable_no_jit_hold_while_building_only(entry):
    for flags in ((True, False, False), (False, True, False), (False, False, True)):
        LayerConfigSpy.seen.clear()
        build(entry, "poolformer_s12", token_mixers=LayerConfigSpy,
              **dict(zip(("scriptable", "exportable", "no_jit"), flags)))
        assert LayerConfigSpy.seen == [flags] * 4
        assert (is_scriptable(), is_exportable(), is_no_jit()) == (False, False, False)


def test_a_hub_source_is_fetched_by_huggingface_hub(tmp_path, monkeypatch):
    """pretrained_cfg_overlay's hf_hub_id: the hub's files in timm's order (a stand-in for the hub here)."""
    import huggingface_hub

    source = build("metaformer", "convformer_s18", seed=9)
    metaformer.save_weights(source, tmp_path / "model.safetensors")
    asked = []

    def fake_download(repo_id, filename, cache_dir=None):
        asked.append((repo_id, filename, cache_dir))
        if filename != "model.safetensors":
            raise FileNotFoundError(filename)
        return str(tmp_path / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    model = build("metaformer", "convformer_s18", pretrained=True, cache_dir=str(tmp_path / "hub"),
                  pretrained_cfg_overlay=dict(hf_hub_id="someone/convformer", url=None))
    assert asked == [("someone/convformer", "model.safetensors", str(tmp_path / "hub"))]
    assert torch.equal(model.stem.conv.weight, source.stem.conv.weight)
    with pytest.raises(metaformer.WeightsError, match="cannot fetch weights from the Hugging Face hub repository "
                                                      "'someone/other' \\(pytorch_model.bin: FileNotFoundError\\)"):
        build("metaformer", "convformer_s18", pretrained=True,
              pretrained_cfg_overlay=dict(hf_hub_id="someone/other", hf_hub_filename="pytorch_model.bin"))
