"""The network and its timm-style surface: the generic checks timm applies to every model,
exact parameter counts and MACs, and parity with independent implementations."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metaformer
from metaformer import ABLATIONS, ablation_spec, create_model, list_models
from metaformer.tools.complexity import count_macs
from metaformer.models.mixers import Pooling

SMALL = 64  # every model here runs at 64x64, batch 2
ALL = list_models()


def small(name, **kw):
    kw.setdefault("img_size", SMALL)
    return create_model(name, **kw)


def x64(b=2, c=3, size=SMALL):
    return torch.randn(b, c, size, size, generator=torch.Generator().manual_seed(0))


# ----- generic checks (as timm's test_models.py does for every model) -----

@pytest.mark.parametrize("name", ALL)
def test_forward_backward_reaches_every_parameter(name):
    torch.manual_seed(0)
    model = small(name, num_classes=42, drop_path_rate=0.0)  # a dropped branch has no gradient by design
    out = model(x64())
    assert out.shape == (2, 42)
    assert torch.isfinite(out).all()
    out.logsumexp(-1).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())]
    assert not missing, f"no finite gradient for {missing[:5]}"
    # every trainable parameter actually gets a non-zero gradient somewhere in the network (but without
    # residual connections, the paper's 0.1% row, the early stages' gradients vanish: that is the finding)
    zero = [n for n, p in model.named_parameters() if p.requires_grad and p.grad.abs().sum() == 0]
    assert not zero or name == "metaformer_s12_no_residual", f"zero gradient for {zero[:5]}"


@pytest.mark.parametrize("name", ["poolformer_s12", "metaformer_ppaa_s12", "metaformer_pppf_s12"])
def test_grad_checkpointing_same_output_and_grads(name):
    torch.manual_seed(0)
    model = small(name, drop_path_rate=0.0)
    x = x64()
    ref = model(x)
    ref.sum().backward()
    ref_grad = model.stem.conv.weight.grad.clone()
    model.zero_grad()
    model.set_grad_checkpointing(True)
    out = model(x)
    out.sum().backward()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.stem.conv.weight.grad, ref_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["poolformer_s12", "metaformer_pppa_s12"])
def test_reset_classifier_and_pre_logits(name):
    model = small(name).eval()
    x = x64()
    pre = model.forward_head(model.forward_features(x), pre_logits=True)
    assert pre.shape == (2, model.num_features)
    model.reset_classifier(0)
    torch.testing.assert_close(model(x), pre)
    model.reset_classifier(7)
    assert model(x).shape == (2, 7)
    assert model.get_classifier().out_features == 7


@pytest.mark.parametrize("name", ["poolformer_s12", "metaformer_ppaa_s12"])
def test_features_only_matches_feature_info(name):
    model = small(name, features_only=True).eval()
    feats = model(x64())
    assert len(feats) == len(model.feature_info) == 4
    for f, info in zip(feats, model.feature_info):
        assert f.shape[1] == info["num_chs"]
        assert SMALL // f.shape[-1] == info["reduction"]
    assert [i["reduction"] for i in model.feature_info] == [4, 8, 16, 32]
    sub = small(name, features_only=True, out_indices=(1, 3))
    assert [f.shape[1] for f in sub(x64())] == [128, 512]
    assert not hasattr(sub, "head")
    # each output goes through its own norm (the authors' dense-prediction backbone)
    assert len(sub.feature_norms) == 2


def test_features_only_outputs_are_normed_stage_outputs():
    full = small("poolformer_s12").eval()
    model = metaformer.MetaFormerFeatures(full).eval()
    with torch.no_grad():
        model.feature_norms[2].weight.uniform_(0.5, 2)
        model.feature_norms[2].bias.normal_()
    x = x64()
    raw = full.forward_intermediates(x, intermediates_only=True)[2]
    n = model.feature_norms[2]
    expected = F.group_norm(raw, 1, n.weight, n.bias, 1e-5)
    torch.testing.assert_close(model(x)[2], expected)


def test_in_chans_1():
    model = small("poolformer_s12", in_chans=1, num_classes=5)
    assert model(torch.randn(2, 1, SMALL, SMALL)).shape == (2, 5)
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        model(torch.randn(2, 3, SMALL, SMALL))


@pytest.mark.parametrize("name", ["poolformer_s12", "metaformer_ppaa_s12"])
def test_torch_export_matches_eager(name):
    model = small(name).eval()
    x = x64()
    ep = torch.export.export(model, (x,))
    torch.testing.assert_close(ep.module()(x), model(x), rtol=1e-5, atol=1e-5)


def test_torch_compile_matches_eager():
    model = small("poolformer_s12").eval()
    x = x64()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_torch_compile_inductor_matches_eager():
    model = small("poolformer_s12").eval()
    x = x64()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model)(x), model(x), rtol=1e-4, atol=1e-4)


# ----- the paper's numbers -----

PARAMS = {"poolformer_s12": 11_915_176, "poolformer_s24": 21_388_968, "poolformer_s36": 30_862_760,
          "poolformer_m36": 56_172_520, "poolformer_m48": 73_473_448}
PAPER_MACS = {"poolformer_s12": 1.8, "poolformer_s24": 3.4, "poolformer_s36": 5.0, "poolformer_m36": 8.8,
              "poolformer_m48": 11.6}


@pytest.mark.parametrize("name", list(PARAMS))
def test_exact_params_and_paper_macs(name):
    with torch.device("meta"):
        model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]
    assert metaformer.get_model_info(name).params == PARAMS[name]
    assert round(count_macs(model)["total"] / 1e9, 1) == PAPER_MACS[name]


@pytest.mark.parametrize("row", list(ABLATIONS))
def test_ablation_rows_match_paper_params_and_macs(row):
    variant, overrides = ablation_spec(row)
    with torch.device("meta"):
        model = create_model(variant, **overrides)
    _, _, paper_params, paper_macs, _ = ABLATIONS[row]
    params = sum(p.numel() for p in model.parameters())
    assert f"{params / 1e6:.1f}M" == paper_params.split()[0]
    assert round(count_macs(model)["total"] / 1e9, 1) == paper_macs


def test_random_mixing_frozen_matrix_size():
    with torch.device("meta"):
        model = create_model("poolformer_s12", token_mixers="random")
    frozen = sum(b.numel() for n, b in model.named_buffers() if "random_matrix" in n)
    assert round(frozen / 1e6) == 21  # the paper's "+21M frozen"
    assert all(not p.requires_grad or "random" not in n for n, p in model.named_parameters())


def test_variant_configs_match_reference():
    cfgs = {n: metaformer.get_model_info(n) for n in PARAMS}
    assert cfgs["poolformer_s12"].config["layer_scale_init_value"] == 1e-5
    assert cfgs["poolformer_s36"].config["layer_scale_init_value"] == 1e-6
    assert [cfgs[n].config["drop_path_rate"] for n in PARAMS] == [0.1, 0.1, 0.2, 0.3, 0.4]
    assert [cfgs[n].default_weights.crop_pct for n in PARAMS] == [0.9, 0.9, 0.9, 0.95, 0.95]
    tf = cfgs["poolformer_m36"].transforms()
    assert tf.transforms[0].size == math.floor(224 / 0.95)
    assert cfgs["poolformer_s12"].default_weights.url.endswith("poolformer_s12.pth.tar")


# ----- parity with independent implementations -----

def test_stage_features_match_timm_and_logits_match_authors_formula():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ours = create_model("poolformer_s12").eval()
    ref = timm.create_model("poolformer_s12").eval()
    # Randomise everything (layer scales included) so a wrong mapping cannot hide behind 1e-5 scales.
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if p.ndim == 1 and p.numel() > 1 else 0.0))
    sd = ref.state_dict()  # same key names: stem.conv, stages.i.*, head.norm, head.fc
    ours.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ours_feats = ours.forward_intermediates(x, intermediates_only=True)
        feat = ref.stem(x)
        worst = 0.0
        for i, stage in enumerate(ref.stages):
            feat = stage(feat)
            worst = max(worst, (ours_feats[i] - feat).abs().max().item())
            torch.testing.assert_close(ours_feats[i], feat, rtol=0, atol=1e-5)
        # the authors' head: GroupNorm(1) on the 7x7 map, then mean, then Linear
        last = ours_feats[-1]
        expected = F.linear(F.group_norm(last, 1, sd["head.norm.weight"], sd["head.norm.bias"], 1e-5).mean((2, 3)),
                            sd["head.fc.weight"], sd["head.fc.bias"])
        logits = ours(x)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    print(f"max |ours - timm| over stage features: {worst:.3g}; "
          f"max |ours - authors' head formula|: {(logits - expected).abs().max().item():.3g}")


def test_pooling_matches_the_authors_formula_and_keeps_constants():
    x = torch.randn(2, 8, 9, 11)
    mixer = Pooling(8, pool_size=3)
    ref = F.avg_pool2d(x, 3, 1, 1, count_include_pad=False) - x
    torch.testing.assert_close(mixer(x), ref)
    # count_include_pad=False: a constant map is mapped to itself, borders included
    const = torch.full((1, 4, 6, 6), 3.0)
    assert mixer(const).abs().max() < 1e-6
    assert Pooling(8, subtract=False)(const).sub(3.0).abs().max() < 1e-6


# ----- input sizes -----

@pytest.mark.parametrize("hw", [(32, 32), (33, 47), (96, 64)])
def test_pooling_models_accept_any_size_from_32(hw):
    model = create_model("poolformer_s12", num_classes=3).eval()
    assert model(torch.randn(1, 3, *hw)).shape == (1, 3)


def test_too_small_input_is_a_clear_error():
    model = small("poolformer_s12")
    with pytest.raises(ValueError, match="at least 32"):
        model(torch.randn(1, 3, 16, 16))


@pytest.mark.parametrize("mixer", ["random", "spatial_mlp"])
def test_token_count_bound_mixers_name_the_expected_size(mixer):
    model = small("poolformer_s12", token_mixers=mixer)
    assert model(x64()).shape == (2, 1000)
    with pytest.raises(ValueError, match=r"16x16 token grid but got 24x24.*img_size"):
        model(x64(size=96))


def test_attention_hybrid_resizes_position_embedding():
    model = small("metaformer_ppaa_s12").eval()
    pos = model.stages[2].pos_embed
    assert pos.size == (4, 4) and isinstance(model.stages[3].pos_embed, nn.Identity)
    assert model(x64(size=96)).shape == (2, 1000)
    built_for_96 = create_model("metaformer_ppaa_s12", img_size=96)
    assert built_for_96.stages[2].pos_embed.size == (6, 6)


# ----- pluggable parts -----

class ShiftMixer(nn.Module):
    """A user's mixer: shift half the channels one token right (no library edit needed)."""

    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        return torch.cat([torch.roll(a, 1, dims=-1), b], dim=1)


def test_user_mixer_class_and_registered_name_plug_in():
    model = small("poolformer_s12", token_mixers=[ShiftMixer, "pooling", "dwconv", ShiftMixer])
    assert isinstance(model.stages[0].blocks[0].token_mixer, ShiftMixer)
    assert model.stages[0].blocks[0].token_mixer.dim == 64
    assert isinstance(model.stages[2].blocks[0].token_mixer, metaformer.models.DWConv)
    assert model(x64()).shape == (2, 1000)
    metaformer.register_token_mixer("shift_test")(ShiftMixer)
    named = small("poolformer_s12", token_mixers="shift_test")
    assert isinstance(named.stages[3].blocks[1].token_mixer, ShiftMixer)


def test_per_stage_options_scalar_or_list():
    model = small("poolformer_s12", norm=["mln", "ln", "bn", "none"], act=["gelu", "relu", "silu", "gelu"],
                  mlp_ratios=[4, 3, 2, 1], pool_size=[3, 5, 7, 9], layer_scale=[True, True, False, True],
                  layer_scale_init_value=[1e-5, 1e-2, 0, 1e-6])
    b = [s.blocks[0] for s in model.stages]
    assert [type(x.norm1).__name__ for x in b] == ["GroupNorm1", "LayerNorm2d", "BatchNorm2d", "NoNorm"]
    assert [type(x.mlp.act).__name__ for x in b] == ["GELU", "ReLU", "SiLU", "GELU"]
    assert [x.mlp.fc1.out_channels // x.mlp.fc1.in_channels for x in b] == [4, 3, 2, 1]
    assert [x.token_mixer.pool_size for x in b] == [3, 5, 7, 9]
    assert isinstance(b[2].layer_scale1, nn.Identity)
    assert b[1].layer_scale1.scale[0].item() == pytest.approx(1e-2)
    assert model(x64()).shape == (2, 1000)
    with pytest.raises(ValueError, match="3 entries but the model has 4 stages"):
        small("poolformer_s12", pool_size=[3, 5, 7])
    with pytest.raises(ValueError, match="unknown norm 'gn'"):
        small("poolformer_s12", norm="gn")
    with pytest.raises(ValueError, match="unknown token mixer"):
        small("poolformer_s12", token_mixers="convolution")


def test_drop_path_linear_over_all_blocks():
    model = small("poolformer_s12", drop_path_rate=0.3)
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for s in model.stages for b in s.blocks]
    assert len(rates) == 12
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.3)
    assert rates[5] == pytest.approx(0.3 * 5 / 11)


def test_ablation_switches_change_the_block():
    x = torch.randn(1, 64, 8, 8)
    blocks = {}
    for key, kw in {"base": {}, "no_res": {"residual": False}, "no_mlp": {"use_mlp": False}}.items():
        torch.manual_seed(0)
        blocks[key] = small("poolformer_s12", layer_scale_init_value=0.5, **kw).stages[0].blocks[0]
    base, no_res, no_mlp = blocks["base"], blocks["no_res"], blocks["no_mlp"]
    assert not any(n.startswith(("mlp.", "norm2.")) for n in no_mlp.state_dict())
    branch = 0.5 * (F.avg_pool2d(base.norm1(x), 3, 1, 1, count_include_pad=False) - base.norm1(x))
    torch.testing.assert_close(no_mlp(x), x + branch)
    y = branch  # no residual: the branch alone feeds the MLP, whose output replaces it
    torch.testing.assert_close(no_res(x), 0.5 * no_res.mlp(no_res.norm2(y)))


def test_mixer_without_residual_replaces_its_input():
    """pool_no_residual: the token-mixer sub-layer is pool(norm(x)) itself (no skip, no LayerScale), the MLP keeps
    its residual; neither fast path takes such a block for a standard one."""
    from metaformer.fast.fuse import unfusable_reason
    from metaformer.fast.training import unsupported_reason

    variant, overrides = ablation_spec("pool_no_residual")
    block = small(variant, layer_scale_init_value=0.5, **overrides).stages[0].blocks[0]
    assert "layer_scale1.scale" not in block.state_dict() and "layer_scale2.scale" in block.state_dict()
    x = torch.randn(1, 64, 8, 8)
    y = F.avg_pool2d(block.norm1(x), 3, 1, 1, count_include_pad=False)
    torch.testing.assert_close(block(x), y + 0.5 * block.mlp(block.norm2(y)))
    assert "token mixer has no residual" in unfusable_reason(block)
    subtracting = small("poolformer_s12", mixer_residual=False).stages[0].blocks[0]  # pool(x) - x, without its skip
    assert "token mixer has no residual" in unsupported_reason(subtracting)
    torch.testing.assert_close(torch.jit.script(block)(x), block(x))


def test_no_weight_decay_lists_biases_norms_layer_scales_and_pos_embed():
    model = small("metaformer_ppaa_s12")
    skip = model.no_weight_decay()
    assert "stages.0.blocks.0.layer_scale1.scale" in skip
    assert "stages.0.blocks.0.norm1.weight" in skip and "head.fc.bias" in skip
    assert "stages.2.pos_embed.pos" in skip
    assert "stages.0.blocks.0.mlp.fc1.weight" not in skip and "head.fc.weight" not in skip


def test_unknown_model_suggests_close_names():
    with pytest.raises(ValueError, match="did you mean.*poolformer_s12"):
        create_model("poolformer_s13")
    assert list_models("poolformer_*") == ["poolformer_s12", "poolformer_s24", "poolformer_s36",
                                           "poolformer_m36", "poolformer_m48"]
