"""The MetaFormer Baselines (IdentityFormer, RandFormer, PoolFormerV2, ConvFormer, CAFormer): exact sizes,
logits equal to timm's implementation on the same weights, both checkpoint layouts, any input size,
dense backbones, export and training through the CLI.

timm implements PoolFormerV2, ConvFormer and CAFormer (not IdentityFormer or RandFormer): its models
are the reference here. The authors' checkpoint layout is written in this file from timm's keys with
a mapping of our own, and that mapping is checked against timm's own converter of the authors'
files (``checkpoint_filter_fn``), never against the library's.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import timm
import torch
from timm.models.metaformer import checkpoint_filter_fn

import metaformer
from metaformer import WeightsError, create_model, get_model_info, list_models, load_weights
from metaformer.cli import main
from metaformer.tools.complexity import count_params, measure
from metaformer.weights import from_ours

FAMILIES = ("identityformer", "randformer", "poolformerv2", "convformer", "caformer")
BASELINES = [n for n in list_models() if n.split("_")[0] in FAMILIES]
TIMM_HAS = ["poolformerv2_s12", "convformer_s18", "caformer_s18"]
CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# sum(p.numel() for p in model.parameters()) of the authors' models, 1000 classes: their RandomMixing
# matrices are frozen Parameters (ours: buffers, the same tensors under the same keys).
AUTHORS_PARAMS = {
    "identityformer_s12": 11_891_712, "identityformer_s24": 21_341_464, "identityformer_s36": 30_791_216,
    "identityformer_m36": 56_077_168, "identityformer_m48": 73_346_056,
    "randformer_s12": 12_127_010, "randformer_s24": 21_812_060, "randformer_s36": 31_497_110,
    "randformer_m36": 56_783_062, "randformer_m48": 74_287_248,
    "poolformerv2_s12": 11_891_712, "poolformerv2_s24": 21_341_464, "poolformerv2_s36": 30_791_216,
    "poolformerv2_m36": 56_077_168, "poolformerv2_m48": 73_346_056,
    "convformer_s18": 26_774_448, "convformer_s36": 40_012_152, "convformer_m36": 57_051_640,
    "convformer_b36": 99_882_616,
    "caformer_s18": 26_341_656, "caformer_s36": 39_297_102, "caformer_m36": 56_204_878, "caformer_b36": 98_753_614,
}


def perturbed(model, seed=0):
    """Every 1-D parameter (norm weights and biases, res scales, StarReLU scale and bias) moved off its
    init, so that no norm or scale is an identity that would hide a wrong eps, placement or key."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim <= 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def images(h=64, w=64, batch=2, dtype=torch.float32):
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(1)).to(dtype)


def timm_to_authors(sd: dict) -> dict:
    """timm's keys -> the authors' (metaformer_baselines.py): Linear pointwise layers, ``downsample_layers``,
    ``stages.i.j``, ``norm`` before the head, and the MLP head's own ``head.norm``."""
    out = {}
    for k, v in sd.items():
        if k.startswith("stem."):
            k = k.replace("stem.conv", "downsample_layers.0.conv").replace("stem.norm", "downsample_layers.0.post_norm")
        elif m := re.match(r"stages\.(\d+)\.downsample\.(norm|conv)\.(.+)", k):
            k = f"downsample_layers.{m[1]}.{'pre_norm' if m[2] == 'norm' else 'conv'}.{m[3]}"
        elif m := re.match(r"stages\.(\d+)\.blocks\.(\d+)\.(.+)", k):
            k = f"stages.{m[1]}.{m[2]}.{m[3]}"
            if v.ndim == 4 and v.shape[2:] == (1, 1):
                v = v[:, :, 0, 0]  # the authors' pointwise layers are nn.Linear
        elif k.startswith("head.norm."):
            k = k.replace("head.norm.", "norm.")
        elif k.startswith("head.fc."):
            k = k.replace("head.fc.", "head.")
        out[k] = v
    return out


# ----------------------------------------------------------------------------------------- the zoo

def test_every_variant_is_registered_with_the_authors_exact_parameter_count():
    assert BASELINES == list(AUTHORS_PARAMS)
    for name in BASELINES:
        with torch.device("meta"):
            model = create_model(name)
        counts = count_params(model)
        assert counts["trainable"] + counts["frozen"] == AUTHORS_PARAMS[name], name
        assert counts["trainable"] == get_model_info(name).params, name  # frozen matrices are not trained
        assert (counts["frozen"] > 0) == name.startswith("randformer"), name
    # 21,841-class ImageNet-21K heads, built from the weights' tag
    for name, params in (("convformer_s18", 69_477_657), ("caformer_s18", 69_044_865), ("caformer_b36", 162_798_007)):
        with torch.device("meta"):
            model = create_model(f"{name}.sail_in22k")
        assert model.num_classes == 21841 and sum(p.numel() for p in model.parameters()) == params


def _readme_round(gmacs: float) -> float:
    return math.floor(gmacs * 10 + 0.5) / 10  # the README's caformer_b36 at 384 is 72.150 G -> 72.2


def test_macs_are_the_authors_readme_figures_at_224_and_384():
    """The README counts convolutions, linears and matrix products, not the norms (fvcore on their code)."""
    for name in BASELINES:
        info = get_model_info(name)
        assert _readme_round(measure(name)["macs_conv_linear"] / 1e9) == info.paper_macs, name
        for w in info.weights:
            if w.img_size == 384:
                assert _readme_round(measure(name, img_size=384)["macs_conv_linear"] / 1e9) == w.gmacs, name


def test_weight_tags_urls_and_their_timm_names():
    own_tags = set(timm.list_pretrained("poolformerv2_*") + timm.list_pretrained("convformer_*")
                   + timm.list_pretrained("caformer_*"))
    for name in BASELINES:
        info = get_model_info(name)
        family = info.family
        assert family == name.split("_")[0] and info.paper == "arXiv:2210.13452"
        for w in info.weights:
            suffix = {"sail_in1k": "", "sail_in1k_384": "_384", "sail_in22k_ft_in1k": "_in21ft1k",
                      "sail_in22k_ft_in1k_384": "_384_in21ft1k", "sail_in22k": "_in21k"}[w.tag]
            assert w.url == f"https://huggingface.co/sail/dl/resolve/main/{family}/{name}{suffix}.pth"
            assert w.crop_pct == 1.0 and w.img_size == (384 if "384" in w.tag else 224)
            assert w.num_classes == (21841 if w.tag == "sail_in22k" else 1000)
            if family in ("identityformer", "randformer"):
                assert w.hf_hub_id is None  # timm has no copy
            else:
                assert w.hf_hub_id == f"timm/{name}.{w.tag}" and f"{name}.{w.tag}" in own_tags
        tags = [w.tag for w in info.weights]
        assert tags == (["sail_in1k"] if family in FAMILIES[:3] else
                        ["sail_in1k", "sail_in1k_384", "sail_in22k_ft_in1k", "sail_in22k_ft_in1k_384", "sail_in22k"])
    assert get_model_info("caformer_b36").get_weights("sail_in22k_ft_in1k_384").top1 == 88.1
    # in timm's registry under our prefix, with the tags' sizes and classes
    assert "metaformer_caformer_s18.sail_in22k_ft_in1k_384" in timm.list_pretrained("metaformer_caformer_s18*")
    with torch.device("meta"):
        big = timm.create_model("metaformer_caformer_s18.sail_in1k_384", pretrained=False)
        k21 = timm.create_model("metaformer_caformer_s18.sail_in22k", pretrained=False)
    assert big.pretrained_cfg["input_size"] == (3, 384, 384) and big.pretrained_cfg["crop_pct"] == 1.0
    assert k21.num_classes == 21841


# ----------------------------------------------------------------------------------------- logits

@pytest.mark.parametrize("name", TIMM_HAS)
def test_logits_equal_timm_on_the_same_weights(name):
    """PoolFormerV2 is timm's to the bit. ConvFormer/CAFormer differ by the MLP head's LayerNorm eps only
    (ours the authors' 1e-5, timm's 1e-6): every stage equal, and equal logits once the eps is timm's."""
    torch.manual_seed(0)
    ours = perturbed(create_model(name))
    theirs = timm.create_model(name, pretrained=False).eval()
    theirs.load_state_dict(from_ours(ours.state_dict(), "timm"), strict=True)
    timm_eps = create_model(name, mlp_head_eps=1e-6).eval()
    timm_eps.load_state_dict(ours.state_dict())
    with torch.no_grad():
        for h, w in ((64, 64), (64, 96)):  # square and not
            x = images(h, w)
            if name.startswith("poolformerv2"):
                assert torch.equal(ours(x), theirs(x))
            else:
                assert rel(timm_eps(x), theirs(x)) <= 1e-5
        # fp64, so that what remains is the math and not rounding
        x = images(64, 96, dtype=torch.float64)
        ours, theirs, timm_eps = ours.double(), theirs.double(), timm_eps.double()
        assert rel(ours.forward_features(x), theirs.forward_features(x)) <= 1e-12
        gap = rel(ours(x), theirs(x))
        if name.startswith("poolformerv2"):
            assert gap <= 1e-12
        else:
            assert 1e-7 < gap < 1e-3  # the eps: real (in fp64 it is not rounding) and small
            assert rel(timm_eps(x), theirs(x)) <= 1e-12


def test_architecture_details_the_logits_rest_on():
    cafe = create_model("caformer_s18", depths=[1, 1, 1, 1])
    attn = cafe.stages[2].blocks[0].token_mixer
    assert attn.qkv.bias is None and attn.proj.bias is None and attn.head_dim == 32
    assert not any(isinstance(m, metaformer.models.PositionEmbedding) for m in cafe.modules())
    assert cafe.head.fc.norm.eps == 1e-5 and cafe.head.norm.eps == 1e-6
    pool = create_model("poolformerv2_s12", depths=[1, 1, 1, 1])
    for m in (cafe, pool):
        block = m.stages[0].blocks[0]
        assert block.norm1.bias is None and block.norm1.eps == 1e-6 and block.mlp.fc1.bias is None
        assert m.stem.norm.bias is None and m.stages[1].downsample.norm.bias is None
        assert [hasattr(s.blocks[0].res_scale1, "scale") for s in m.stages] == [False, False, True, True]
        assert not any(hasattr(s.blocks[0].layer_scale1, "scale") for s in m.stages)
    assert isinstance(pool.stages[0].blocks[0].norm1, torch.nn.GroupNorm)  # statistics over (C, H, W)


# ----------------------------------------------------------------------------------------- layouts

@pytest.mark.parametrize("name", TIMM_HAS)
def test_authors_and_timm_layouts_load_strictly_and_convert_both_ways(name, tmp_path):
    torch.manual_seed(0)
    theirs = perturbed(timm.create_model(name, pretrained=False))
    timm_sd = theirs.state_dict()
    authors = timm_to_authors(timm_sd)
    # our mapping of the authors' layout is the one timm's own converter undoes
    back = checkpoint_filter_fn(authors, theirs)
    assert back.keys() == timm_sd.keys() and all(torch.equal(back[k], timm_sd[k]) for k in back)
    if "head.fc.fc1.weight" in timm_sd:  # the MLP head: the authors' head.norm is [4C], timm's [C]
        assert authors["head.norm.weight"].shape[0] == 4 * authors["norm.weight"].shape[0]

    x = images(64, 96)
    with torch.no_grad():
        want = theirs.forward_features(x)
    loaded = {}
    for layout, sd in (("authors_v2", authors), ("timm", timm_sd)):
        path = tmp_path / f"{layout}.pth"
        torch.save(sd, path)
        model = create_model(name)
        report = load_weights(model, path)
        assert report.layout == layout and report.ok and not report.reinitialised
        with torch.no_grad():  # the same numbers (CAFormer's attention stages: other kernels, fp32 rounding)
            assert rel(model.eval().forward_features(x), want) <= 1e-5
        loaded[layout] = model.state_dict()
    assert all(torch.equal(loaded["timm"][k], loaded["authors_v2"][k]) for k in loaded["timm"])
    ours = loaded["timm"]
    for layout, expected in (("authors_v2", authors), ("timm", timm_sd)):  # and written back, exactly
        written = from_ours(ours, layout)
        assert written.keys() == expected.keys()
        assert all(written[k].shape == expected[k].shape and torch.equal(written[k], expected[k]) for k in written)


@pytest.mark.parametrize("name", ["identityformer_s12", "randformer_s12"])
def test_families_timm_lacks_round_trip_through_the_authors_layout(name, tmp_path):
    small = dict(depths=[1, 1, 2, 1], dims=[16, 32, 48, 64], img_size=64)
    torch.manual_seed(0)
    source = perturbed(create_model(name, **small))
    authors = from_ours(source.state_dict(), "authors_v2")
    expected = {"downsample_layers.0.conv.weight", "downsample_layers.0.post_norm.weight",
                "downsample_layers.1.pre_norm.weight", "downsample_layers.1.conv.bias", "stages.0.0.norm1.weight",
                "stages.2.1.mlp.fc1.weight", "stages.2.1.mlp.act.scale", "stages.2.1.res_scale2.scale", "norm.weight",
                "norm.bias", "head.weight", "head.bias"}
    assert expected <= authors.keys() and not any(k.startswith(("stem.", "network.")) for k in authors)
    assert authors["stages.2.1.mlp.fc1.weight"].ndim == 2 and not any(k.endswith("norm1.bias") for k in authors)
    mixers = {k for k in authors if ".token_mixer." in k}
    if name.startswith("randformer"):  # one frozen matrix per block, in stages 3-4 only
        assert mixers == {"stages.2.0.token_mixer.random_matrix", "stages.2.1.token_mixer.random_matrix",
                          "stages.3.0.token_mixer.random_matrix"}
        assert authors["stages.2.0.token_mixer.random_matrix"].shape == (16, 16)  # 4x4 tokens at 64 px
    else:
        assert not mixers
    path = tmp_path / "authors.pth"
    torch.save(authors, path)
    model = create_model(name, **small)
    assert load_weights(model, path).layout == "authors_v2"
    x = images()
    with torch.no_grad():
        assert torch.equal(model.eval()(x), source(x))


def test_convert_writes_an_authors_caformer_file_as_timm_checked_in_timm(tmp_path):
    from metaformer.tools.convert import convert

    torch.manual_seed(0)
    src = tmp_path / "caformer_s18.pth"
    torch.save(from_ours(perturbed(create_model("caformer_s18")).state_dict(), "authors_v2"), src)
    result = convert(str(src), tmp_path / "timm.pth", "timm")
    assert result.variant == "caformer_s18" and result.source_layout == "authors_v2"
    assert "timm (features)" in result.checked_in and result.max_diff <= 1e-5
    timm.create_model("caformer_s18", pretrained=False).load_state_dict(torch.load(tmp_path / "timm.pth"), strict=True)


# ----------------------------------------------------------------------------------------- input sizes

def test_randformer_is_built_for_the_size_it_is_given(tmp_path):
    small = dict(depths=[1, 1, 1, 1], dims=[16, 32, 48, 64])
    for size, (h, w) in ((64, (64, 64)), ((64, 96), (64, 96))):
        model = create_model("randformer_s12", img_size=size, **small).eval()
        grid = model.stages[2].blocks[0].token_mixer.random_matrix.shape
        assert grid == ((h // 16) * (w // 16),) * 2
        assert model.pretrained_cfg["fixed_input_size"]
        with torch.no_grad():
            assert model(images(h, w)).shape == (2, 1000)
        with pytest.raises(ValueError, match=r"build the model for this input size"):
            model(images(96, 128))
    # the authors' 224 matrices do not fit a model built for 64 px: the error says what to rebuild
    at224 = create_model("randformer_s12", **small)
    with pytest.raises(WeightsError, match="img_size"):
        load_weights(create_model("randformer_s12", img_size=64, **small), from_ours_file(at224, tmp_path / "w.pth"))


def from_ours_file(model, path, layout="authors_v2"):
    torch.save(from_ours(model.state_dict(), layout), path)
    return path


# ----------------------------------------------------------------------------------------- tools

def test_caformer_backbone_through_toy_detection_and_segmentation(tmp_path):
    from metaformer.tasks.dense import MetaFormerBackbone
    from metaformer.tasks.dense.data import make_toy_data

    dims = ["--override", "depths=[1,1,1,1]", "--override", "dims=[32,32,64,64]"]
    bb = MetaFormerBackbone("caformer_s18", depths=[1, 1, 1, 1], dims=[32, 32, 64, 64], verbose=False)
    feats = bb(torch.randn(1, 3, 96, 128))
    assert [tuple(f.shape[1:]) for f in feats] == [(32, 24, 32), (32, 12, 16), (64, 6, 8), (64, 3, 4)]
    toy = make_toy_data(tmp_path / "toy", num_train=4, num_val=2, size=96, seed=0)
    det = tmp_path / "det"
    assert main(["detect", "train", "--train-images", str(toy / "images/training"), "--train-ann",
                 str(toy / "instances_training.json"), "--arch", "mask_rcnn", "--output", str(det),
                 "--backbone", "caformer_s18", *dims, "--fpn-channels", "32", "--min-size", "96", "--max-size", "96",
                 "--epochs", "1", "--warmup-iters", "1", "--workers", "0", "--batch-size", "2",
                 "--detector-opt", "box_head_dim=64", "--detector-opt", "mask_head_channels=16"]) == 0
    assert (det / "last.pth").is_file()
    seg = tmp_path / "seg"
    assert main(["segment", "train", "--data-root", str(toy), "--no-val", "--num-classes", "4", "--output", str(seg),
                 "--backbone", "caformer_s18", *dims, "--fpn-channels", "32", "--img-scale", "128", "96",
                 "--crop-size", "96", "--iters", "4", "--batch-size", "2", "--workers", "0", "--log-every", "2"]) == 0
    assert (seg / "last.pth").is_file()


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "exported"])
def test_caformer_exports_with_parity(tmp_path, fmt):
    from metaformer.tools.export import export
    from metaformer.tools.exported import load_runtime

    torch.manual_seed(0)
    model = perturbed(create_model("caformer_s18", img_size=64, num_classes=10, depths=[1, 1, 1, 1]))
    result = export(model, tmp_path / "m", fmt, dynamic_batch=True)
    assert result.ok and result.max_diff_random <= 1e-4
    run = load_runtime(result.path)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert (run(x) - model(x)).abs().max() <= 1e-4 * model(x).abs().max()


@pytest.mark.parametrize("name", ["convformer_s18", "caformer_s18"])
def test_train_a_tiny_convformer_and_caformer_on_the_digits(name, tmp_path):
    assert main(["train", "--model", name, "--depths", "1", "1", "1", "1", "--dims", "32", "32", "64", "64",
                 "--epochs", "1", "--batch-size", "64", "--workers", "0", "--output", str(tmp_path)]) == 0
    ckpt = torch.load(tmp_path / "last.pth", weights_only=True)
    assert ckpt["model_config"]["mlp_head"] and ckpt["model_config"]["dims"] == [32, 32, 64, 64]
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("config", sorted(p.name for p in CONFIGS.glob("*.yaml")
                                          if p.name.split("_")[0] in FAMILIES))
def test_family_recipes_resolve_to_the_authors_settings(config):
    from metaformer.tasks.train_config import resolve_config

    cfg = resolve_config({}, str(CONFIGS / config))
    info = get_model_info(cfg.model)
    assert info.family == config.split("_")[0]
    global_batch = cfg.batch_size * cfg.accum_steps * 8  # the 8 GPUs the files' comments assume
    lr = cfg.base_lr * global_batch / 1024
    if "384" in config:  # fine-tuning from the 224 weights: 30 epochs at a constant lr, EMA, no Mixup/CutMix
        assert cfg.img_size == 384 and cfg.epochs == 30 and cfg.sched == "constant" and cfg.ema
        assert cfg.mixup == 0 and cfg.cutmix == 0 and global_batch == 1024
        assert (cfg.opt, lr) == (("lamb", 1e-4) if info.family == "caformer" else ("adamw", 5e-5))
        assert cfg.pretrained == f"{cfg.model}.sail_in1k" and get_model_info(cfg.model).get_weights("sail_in1k").img_size == 224
        assert cfg.drop_path > info.config["drop_path_rate"] and cfg.model_kwargs["head_dropout"] > 0
    else:
        assert cfg.img_size == 224 and cfg.epochs == 300 and global_batch == 4096
        assert (cfg.opt, lr) == (("lamb", 8e-3) if info.family == "caformer" else ("adamw", 4e-3))
        assert cfg.warmup_epochs == (20 if info.family in ("convformer", "caformer") else 5)
    with torch.device("meta"):
        create_model(cfg.model, img_size=cfg.img_size, **cfg.model_kwargs)


def test_ablation_rows_compare_the_families():
    from metaformer import ABLATIONS, ablation_spec

    for row, variant in (("identityformer", "identityformer_s12"), ("randformer", "randformer_s12"),
                         ("poolformerv2", "poolformerv2_s12"), ("convformer", "convformer_s18"),
                         ("caformer", "caformer_s18")):
        assert ablation_spec(row) == (variant, {})
        assert ABLATIONS[row][4] == get_model_info(variant).top1 and ABLATIONS[row][3] == get_model_info(variant).paper_macs


@pytest.mark.parametrize("name", ["caformer_s18", "randformer_s12"])
def test_grad_cam_on_attention_and_random_mixing_models(name):
    """Grad-CAM hooks the last stage of any family: a map over the image for the predicted class."""
    import numpy as np
    import torchvision.transforms as T
    from PIL import Image

    from metaformer.tools.cam import grad_cam

    torch.manual_seed(0)
    model = create_model(name, depths=[1, 1, 1, 1], dims=[16, 32, 64, 64], img_size=64, num_classes=3).eval()
    transform = T.Compose([T.Resize((64, 64)), T.ToTensor()])
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    result = grad_cam(model, image, transform)
    with torch.no_grad():
        probs = model(transform(image)[None]).softmax(-1)[0]
    assert result.target == int(probs.argmax()) and result.probability == pytest.approx(float(probs.max()), abs=1e-6)
    assert result.heatmap.shape == (64, 64) and np.isfinite(result.heatmap).all()
    assert result.heatmap.min() >= 0 and result.heatmap.max() > result.heatmap.min()
