"""timm conformance: the models we register in timm's registry (every PoolFormer variant, the S12 hybrids,
the Table-5 ablation rows, and one size of each MetaFormer Baselines family; their other sizes are
built through timm on the meta device) pass the checks of timm's generic per-model tests (pytorch-image-models'
tests/test_models.py), asserted here in our own words: forward (and with gradient checkpointing),
backward, default_cfgs, load_pretrained (in_chans=1, num_classes 5 and 0), TorchScript,
forward_features (FeatureInfo), forward_intermediates and its features variant, FX forward and
backward, FX + TorchScript, TorchScript of FX features (each compiled form against the eager values,
where timm's own file checks only that outputs are finite); and timm's data config reproduces our
eval transform. Built through ``timm.create_model``, with one block per stage so the whole matrix
runs in CI (every code path of a variant is in its first block; the full-size models are checked
by running timm's own file, see the README)."""
import math

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.models import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import metaformer
from metaformer.weights import from_ours
from metaformer.zoo import get_model_info, split_name

OURS = sorted(timm.list_models("metaformer_*"))
# The MetaFormer Baselines' sizes differ from each other only in depths and dims, and these checks build
# every model with one block per stage: one size per family runs the whole matrix, beside every
# PoolFormer v1 model (each ablation row is a code path of its own). The other sizes are built through
# timm on the meta device below. This keeps the file at CI speed (the matrix over all 51 models took
# ~12 CPU-minutes).
BASELINES = ("identityformer", "randformer", "poolformerv2", "convformer", "caformer")
REPRESENTATIVES = {"metaformer_identityformer_s12", "metaformer_randformer_s12", "metaformer_poolformerv2_s12",
                   "metaformer_convformer_s18", "metaformer_caformer_s18"}
CHECKED = [n for n in OURS if split_name(n)[0].split("_")[0] not in BASELINES or n in REPRESENTATIVES]
SMALL = dict(depths=[1, 1, 1, 1])
FEAT = 96  # the size timm's feature tests use


def build(name, **kwargs):
    return timm.create_model(name, pretrained=False, **SMALL, **kwargs)


def size_of(model) -> int:
    return model.default_cfg["input_size"][-1] if model.default_cfg.get("fixed_input_size") else 128


def inputs(model, batch=1, size=None):
    torch.manual_seed(0)
    s = size or size_of(model)
    return torch.randn(batch, 3, s, s)


def fx_model(model, train=False):
    kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                  param_shapes_constant=True)
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=kwargs)
    return create_feature_extractor(model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]],
                                    tracer_kwargs=kwargs)


def test_every_model_is_registered_without_shadowing_timm():
    from timm.models._registry import _model_to_module

    assert len(OURS) == len(metaformer.list_models())
    assert {f"metaformer_s12_{row}" for row, (overrides, *_) in metaformer.ABLATIONS.items() if row != "baseline"
            and "variant" not in overrides} <= set(OURS)  # the Table-5 rows too (hybrid and family rows are variants)
    for name in metaformer.list_models():
        assert metaformer.zoo.timm_name(name) in OURS
    for name in OURS:
        assert _model_to_module[name] == "timm_registry", name
    # timm's own names still build timm's models
    for theirs in ("poolformer_s12", "poolformerv2_s12", "convformer_s18", "caformer_s18"):
        assert _model_to_module[theirs] == "metaformer"  # timm.models.metaformer
        assert type(timm.create_model(theirs, pretrained=False)).__module__ == "timm.models.metaformer"


def test_every_other_size_builds_through_timm_with_its_tags():
    """The Baselines' sizes the matrix leaves out: built by timm (meta device: shapes only), each tag's
    config, the classifier and first conv it names, four feature stages."""
    others = [n for n in OURS if n not in CHECKED]
    assert len(others) == 18 and REPRESENTATIVES <= set(CHECKED)
    for name in others:
        for tag in timm.list_pretrained(name) or [name]:
            with torch.device("meta"):
                model = timm.create_model(tag, pretrained=False)
            cfg = model.pretrained_cfg
            weights = metaformer.get_weights(tag[len("metaformer_"):])
            assert cfg["input_size"] == (3, weights.img_size, weights.img_size) and cfg["crop_pct"] == 1.0
            assert model.num_classes == weights.num_classes
            state = model.state_dict()
            assert cfg["classifier"] + ".weight" in state and cfg["first_conv"] + ".weight" in state
            assert [f["reduction"] for f in model.feature_info] == [4, 8, 16, 32]


@pytest.mark.parametrize("name", CHECKED)
def test_forward_and_gradient_checkpointing(name):
    model = build(name).eval()
    x = inputs(model)
    out = model(x)
    assert out.shape == (1, model.num_classes) and not torch.isnan(out).any()
    model.set_grad_checkpointing()
    torch.testing.assert_close(model(x), out, rtol=1e-4, atol=1e-5)  # grad enabled: the checkpointed path


@pytest.mark.parametrize("name", CHECKED)
def test_backward_reaches_every_parameter(name):
    model = build(name, num_classes=42).train()
    out = model(inputs(model, batch=2))
    out.mean().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, f"no gradient for {n}"
    assert out.shape[-1] == 42 and not torch.isnan(out).any()


@pytest.mark.parametrize("name", CHECKED)
def test_default_cfg_heads_and_reset_classifier(name):
    model = build(name).eval()
    cfg = model.default_cfg
    for key in ("input_size", "pool_size", "crop_pct", "interpolation", "mean", "std", "num_classes", "first_conv",
                "classifier"):
        assert key in cfg, key
    assert model.num_classes >= 0 and model.num_features > 0 and model.head_hidden_size > 0
    x = torch.randn(1, *cfg["input_size"])
    feats = model.forward_features(x)
    assert tuple(feats.shape[2:]) == tuple(cfg["pool_size"]) and feats.shape[1] == model.num_features
    pre = model.forward_head(feats, pre_logits=True)
    assert pre.shape == (1, model.head_hidden_size)
    state = model.state_dict()
    assert cfg["classifier"] + ".weight" in state and cfg["first_conv"] + ".weight" in state
    model.reset_classifier(0)
    assert model.num_classes == 0 and model(x).shape == pre.shape
    model.reset_classifier(0, "")
    out = model(x)
    assert out.ndim == 4 and tuple(out.shape[2:]) == tuple(cfg["pool_size"])
    unpooled = build(name, num_classes=0, global_pool="").eval()
    assert unpooled(x).ndim == 4


@pytest.mark.parametrize("name", [n for n in CHECKED if timm.models.get_pretrained_cfg(n).has_weights])
@pytest.mark.parametrize("layout", ["authors", "timm"])
def test_load_pretrained_with_another_stem_and_classifier(name, layout, tmp_path):
    """timm's own pretrained path (its loader, our filter), from a file in the authors' or timm's layout."""
    source = build(name).eval()
    arch = split_name(name)[0]
    if layout == "authors" and get_model_info(arch).config.get("stem_norm"):
        layout = "authors_v2"
    path = tmp_path / "w.pth"
    torch.save(from_ours(source.state_dict(), layout), path)
    for num_classes in (5, 0):
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), in_chans=1,
                                  num_classes=num_classes, **SMALL)
        assert model.num_classes == num_classes and model.stem.conv.weight.shape[1] == 1
        torch.testing.assert_close(model.stem.conv.weight[:, 0], source.stem.conv.weight.sum(1))
        key = "stages.3.blocks.0.norm1.weight"
        torch.testing.assert_close(model.state_dict()[key], source.state_dict()[key])


@pytest.mark.parametrize("name", CHECKED)
def test_torchscript(name):
    with timm.layers.set_scriptable(True):
        model = build(name).eval()
    scripted = torch.jit.script(model)
    x = inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))


@pytest.mark.parametrize("name", CHECKED)
@pytest.mark.parametrize("feature_cls", [None, "getter"])
def test_features_only(name, feature_cls):
    kwargs = {} if feature_cls is None else {"feature_cls": feature_cls}
    fixed = build(name).default_cfg.get("fixed_input_size")
    model = build(name, features_only=True, **({"img_size": FEAT} if fixed else {}), **kwargs).eval()
    channels, reduction = model.feature_info.channels(), model.feature_info.reduction()
    assert len(channels) >= 3
    outs = model(torch.randn(1, 3, FEAT, FEAT))
    assert len(outs) == len(channels)
    for c, r, o in zip(channels, reduction, outs):
        assert o.shape[1] == c and o.shape[2] <= math.ceil(FEAT / r) + 1 and o.shape[3] <= math.ceil(FEAT / r) + 1
        assert not torch.isnan(o).any()


@pytest.mark.parametrize("name", CHECKED)
def test_forward_intermediates(name):
    fixed = build(name).default_cfg.get("fixed_input_size")
    model = build(name, **({"img_size": FEAT} if fixed else {})).eval()
    info = timm.models.FeatureInfo(model.feature_info, len(model.feature_info))
    x = torch.randn(1, 3, FEAT, FEAT)
    final, intermediates = model.forward_intermediates(x, output_fmt="NCHW")
    assert len(intermediates) == len(info.channels()) == 4
    for c, r, o in zip(info.channels(), info.reduction(), intermediates):
        assert o.shape[1] == c and o.shape[2] <= math.ceil(FEAT / r) + 1
    torch.testing.assert_close(final, model.forward_features(x))
    last2 = model.forward_intermediates(x, indices=2, intermediates_only=True)
    assert [o.shape[1] for o in last2] == info.channels()[-2:]
    model.set_grad_checkpointing()
    torch.testing.assert_close(model.forward_intermediates(x)[0], final, rtol=1e-4, atol=1e-5)
    kept = model.prune_intermediate_layers([0, 1])
    assert kept == [0, 1] and len(model.stages) == 2 and model.num_features == info.channels()[1]


@pytest.mark.parametrize("name", CHECKED)
def test_fx_forward_backward_and_torchscript(name):
    model = build(name).eval()
    x = inputs(model)
    with torch.inference_mode():
        eager = model(x)
        traced = fx_model(model)
        assert torch.equal(torch.cat(tuple(traced(x).values())), eager)  # bit-exact, as timm asserts
    scripted = torch.jit.script(fx_model(model))
    with torch.inference_mode():
        torch.testing.assert_close(torch.cat(tuple(scripted(x).values())), eager)  # the eager values, not just finite

    train = build(name, num_classes=42).train()
    out = torch.cat(tuple(fx_model(train, train=True)(inputs(train, batch=2)).values()))
    out.mean().backward()
    assert out.shape[-1] == 42
    for n, p in train.named_parameters():
        assert p.grad is not None, f"no gradient for {n} through FX"


@pytest.mark.parametrize("name", ["metaformer_poolformer_s12", "metaformer_ppaa_s12", "metaformer_s12_random"])
def test_torchscript_of_fx_features(name):
    fixed = build(name).default_cfg.get("fixed_input_size")
    model = build(name, features_only=True, feature_cls="fx", **({"img_size": FEAT} if fixed else {})).eval()
    scripted = torch.jit.script(model)
    x = torch.randn(1, 3, FEAT, FEAT)
    with torch.no_grad():
        outs, eager = scripted(x), model(x)
    assert [o.shape[1] for o in outs] == model.feature_info.channels()
    for out, want in zip(outs, eager):
        torch.testing.assert_close(out, want)


@pytest.mark.parametrize("name", [n for n in timm.list_pretrained("metaformer_*") if n.split(".")[0] in CHECKED])
def test_timm_data_config_reproduces_our_eval_transform(name):
    """timm.data.resolve_model_data_config + create_transform == the weights' own eval transform, to the pixel."""
    model = timm.create_model(name, pretrained=False, **SMALL)
    tf = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
    ours = metaformer.get_weights(name[len("metaformer_"):]).transforms()
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (300, 420, 3), dtype=np.uint8))
    assert torch.equal(tf(img), ours(img))


@pytest.mark.parametrize("imports", ["import metaformer, timm", "import timm, metaformer", "import metaformer.models, timm",
                                     "import metaformer; metaformer.list_models(); import timm"])
def test_registration_does_not_depend_on_import_order(imports):
    """Our models are in timm's registry whichever of timm and metaformer is imported first (isort writes
    ``import metaformer, timm``), also when one of our modules imports timm first; the finder that waits for timm
    leaves ``sys.meta_path`` once they are."""
    import subprocess
    import sys

    code = (f"{imports}\nimport sys, torch\nwith torch.device('meta'):\n"
            "    model = timm.create_model('metaformer_poolformer_s12')\n"
            "print(type(model).__name__, model.variant, [type(f).__name__ for f in sys.meta_path if "
            "type(f).__module__ == 'metaformer'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["MetaFormer", "poolformer_s12", "[]"]
