"""Weights I/O: every checkpoint layout loads strictly, errors are clear, saved files rebuild models.

Foreign layouts are written here from a model's own state dict with explicit key mappings
of their own (ours -> theirs), never with the library's converter.
"""
from __future__ import annotations

import copy
import json
import os
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metaformer
from metaformer import WeightsError, load_model, load_weights, save_weights
from metaformer.cli import main
from metaformer.weights import read_metadata

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
# Tests about configs rather than layouts use a small S12 (fewer, narrower blocks) to stay fast.
SMALL = dict(depths=[1, 1, 2, 1], dims=[32, 64, 96, 128])


def randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    """Move norms and layer scales off their init so that every tensor shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_scale" in name:
                p.copy_(0.1 + 0.4 * torch.rand(p.shape, generator=g))
            elif p.ndim == 1:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ----- foreign layouts, written from our keys ------------------------------------------------

def authors_network(model) -> list[tuple[str, int]]:
    """The authors' flat ``network`` list: (kind, stage) per entry."""
    entries = []
    for i, stage in enumerate(model.stages):
        if isinstance(stage.pos_embed, metaformer.models.PositionEmbedding):
            entries.append(("pos", i))
        entries.append(("blocks", i))
        if i + 1 < len(model.stages):
            entries.append(("down", i + 1))
    return entries


def to_authors(model, spatial_fc_as_conv1d: bool = True) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    out = {"patch_embed.proj.weight": sd["stem.conv.weight"], "patch_embed.proj.bias": sd["stem.conv.bias"],
           "norm.weight": sd["head.norm.weight"], "norm.bias": sd["head.norm.bias"],
           "head.weight": sd["head.fc.weight"], "head.bias": sd["head.fc.bias"]}
    block_names = {"layer_scale1.scale": "layer_scale_1", "layer_scale2.scale": "layer_scale_2",
                   "token_mixer.proj.weight": "token_mixer.fc.weight"}
    for k, (kind, i) in enumerate(authors_network(model)):
        if kind == "pos":
            out[f"network.{k}.pos_embed"] = sd[f"stages.{i}.pos_embed.pos"]
        elif kind == "down":
            for p in ("weight", "bias"):
                out[f"network.{k}.proj.{p}"] = sd[f"stages.{i}.downsample.conv.{p}"]
        else:
            prefix = f"stages.{i}.blocks."
            for key, v in sd.items():
                if not key.startswith(prefix):
                    continue
                j, rest = key[len(prefix):].split(".", 1)
                is_attention = f"{prefix}{j}.token_mixer.qkv.weight" in sd
                if rest == "token_mixer.proj.weight" and not is_attention:  # SpatialFc
                    name = block_names[rest]
                    v = v.unsqueeze(-1) if spatial_fc_as_conv1d else v
                else:
                    name = block_names.get(rest, rest)
                out[f"network.{k}.{j}.{name}"] = v
    assert len(out) == len(sd), "every tensor of the model must have an authors' key"
    return out


def to_huggingface(model) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    out = {"norm.weight": sd["head.norm.weight"], "norm.bias": sd["head.norm.bias"],
           "classifier.weight": sd["head.fc.weight"], "classifier.bias": sd["head.fc.bias"]}
    for p in ("weight", "bias"):
        out[f"poolformer.encoder.patch_embeddings.0.projection.{p}"] = sd[f"stem.conv.{p}"]
        for i in range(1, 4):
            out[f"poolformer.encoder.patch_embeddings.{i}.projection.{p}"] = sd[f"stages.{i}.downsample.conv.{p}"]
    names = {"norm1.weight": "before_norm.weight", "norm1.bias": "before_norm.bias",
             "norm2.weight": "after_norm.weight", "norm2.bias": "after_norm.bias",
             "mlp.fc1.weight": "output.conv1.weight", "mlp.fc1.bias": "output.conv1.bias",
             "mlp.fc2.weight": "output.conv2.weight", "mlp.fc2.bias": "output.conv2.bias",
             "layer_scale1.scale": "layer_scale_1", "layer_scale2.scale": "layer_scale_2"}
    for key, v in sd.items():
        parts = key.split(".")
        if parts[0] == "stages" and parts[2] == "blocks":
            out[f"poolformer.encoder.block.{parts[1]}.{parts[3]}.{names['.'.join(parts[4:])]}"] = v
    assert len(out) == len(sd)
    return out


def write(obj, path, fmt: str = "torch"):
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in obj.items()}, str(path))
    else:
        torch.save(obj, path)
    return path


_TEMPLATES: dict = {}


def fresh(name: str = "poolformer_s12", seed: int = 123, **kw) -> nn.Module:
    """A model whose every tensor differs from any source's, so a tensor the loader skips shows.

    Models are built once per config and copied: the authors' trunc_normal init dominates the
    cost of a test otherwise.
    """
    key = (name, json.dumps(kw, sort_keys=True, default=repr))
    if key not in _TEMPLATES:
        _TEMPLATES[key] = metaformer.create_model(name, **kw)
    model = copy.deepcopy(_TEMPLATES[key]).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.normal_(0.0, 0.05, generator=g)
    return model


@pytest.fixture(scope="module")
def s12():
    return randomised(fresh(seed=0))


@pytest.fixture(scope="module")
def s12_out(s12):
    with torch.no_grad():
        return s12(X)


# ----- every layout round-trips ------------------------------------------------------------

@pytest.mark.parametrize("layout,filename,wrap", [
    ("authors", "poolformer_s12.pth.tar", None),
    ("authors", "poolformer_s12.pth", "state_dict"),
    ("timm", "poolformer_s12.pth", "state_dict"),
    ("timm", "ddp.pt", "module"),
    ("timm", "poolformer_s12.safetensors", None),
    ("huggingface", "model.safetensors", None),
    ("huggingface", "pytorch_model.bin", "model"),
])
def test_layouts_load_strictly_and_bit_identical(s12, s12_out, tmp_path, layout, filename, wrap):
    sd = {"authors": to_authors, "huggingface": to_huggingface, "timm": lambda m: dict(m.state_dict())}[layout](s12)
    if wrap == "module":
        obj = {"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}
    elif wrap:
        obj = {wrap: sd, "epoch": 3, "arch": "poolformer_s12"}
    else:
        obj = sd
    path = write(obj, tmp_path / filename, "safetensors" if filename.endswith(".safetensors") else "torch")
    model = fresh()
    report = load_weights(model, path)
    assert report.layout == layout and report.ok and report.loaded == len(s12.state_dict())
    assert_same_tensors(model.state_dict(), s12.state_dict())
    with torch.no_grad():
        assert torch.equal(model(X), s12_out)


def test_own_layout_round_trip(s12, tmp_path):
    path = save_weights(s12, tmp_path / "s12.safetensors")
    model = fresh()
    report = load_weights(model, path)
    assert report.layout == "metaformer" and report.ok
    assert_same_tensors(model.state_dict(), s12.state_dict())


@pytest.mark.parametrize("name", ["metaformer_ppaa_s12", "metaformer_pppa_s12", "metaformer_pppf_s12",
                                  "metaformer_ppff_s12"])
def test_authors_hybrids_pos_embed_shift_and_spatial_fc(tmp_path, name):
    src = randomised(fresh(name, seed=0, img_size=64))
    sd = to_authors(src)
    if "a" in name.split("_")[1]:  # the position embedding entry shifts every later network index
        first_attn = name.split("_")[1].index("a")
        assert f"network.{2 * first_attn}.pos_embed" in sd
        assert f"network.{2 * first_attn + 1}.0.token_mixer.qkv.weight" in sd
    else:
        assert any(k.endswith("token_mixer.fc.weight") and v.ndim == 3 for k, v in sd.items())
    path = write(sd, tmp_path / f"{name}.pth.tar")
    model = fresh(name, img_size=64)
    report = load_weights(model, path)
    assert report.layout == "authors" and report.ok and not report.adapted
    assert_same_tensors(model.state_dict(), src.state_dict())
    with torch.no_grad():
        assert torch.equal(model(X), src(X))


def test_authors_spatial_fc_as_linear_also_loads(tmp_path):
    src = randomised(fresh("metaformer_pppf_s12", seed=0, img_size=64))
    path = write(to_authors(src, spatial_fc_as_conv1d=False), tmp_path / "pppf.pth")
    model = fresh("metaformer_pppf_s12", img_size=64)
    load_weights(model, path)
    assert_same_tensors(model.state_dict(), src.state_dict())


def test_position_embedding_of_another_grid_is_resized(tmp_path):
    src = randomised(metaformer.create_model("metaformer_ppaa_s12", img_size=128))  # stage 2 grid 8x8
    path = write(to_authors(src), tmp_path / "ppaa_128.pth")
    model = fresh("metaformer_ppaa_s12", img_size=64)  # stage 2 grid 4x4
    report = load_weights(model, path)
    assert report.adapted and "stages.2.pos_embed.pos" in report.adapted[0]
    expected = F.interpolate(src.stages[2].pos_embed.pos.detach(), size=(4, 4), mode="bicubic", align_corners=False)
    assert torch.allclose(model.stages[2].pos_embed.pos, expected)
    assert torch.equal(model.stages[2].blocks[0].token_mixer.qkv.weight, src.stages[2].blocks[0].token_mixer.qkv.weight)


# ----- timm's real model ----------------------------------------------------------------------

def test_timm_model_state_dict_loads_and_features_agree(tmp_path):
    import timm

    torch.manual_seed(1)
    ref = randomised(timm.create_model("poolformer_s12", pretrained=False), seed=1)
    path = write(ref.state_dict(), tmp_path / "timm_s12.pth")
    model = fresh()
    report = load_weights(model, path)
    assert report.layout == "timm" and report.ok
    with torch.no_grad():
        ours = model.forward_intermediates(X, intermediates_only=True)
        theirs = ref.forward_intermediates(X, intermediates_only=True)
        assert len(ours) == len(theirs) == 4
        for a, b in zip(ours, theirs):
            assert a.shape == b.shape
            assert (a - b).abs().max() < 1e-5
        # The head keeps the authors' math: GroupNorm(1) on the map, then the mean, then Linear.
        sd = ref.state_dict()
        authors = F.linear(F.group_norm(ours[-1], 1, sd["head.norm.weight"], sd["head.norm.bias"]).mean((2, 3)),
                           sd["head.fc.weight"], sd["head.fc.bias"])
        assert torch.allclose(model(X), authors, atol=1e-5)


# ----- clear errors -------------------------------------------------------------------------

def test_wrong_architecture_names_keys_and_variant(s12, tmp_path):
    s24 = fresh("poolformer_s24")
    path = write(to_authors(s24), tmp_path / "poolformer_s24.pth.tar")
    with pytest.raises(WeightsError) as e:
        load_weights(fresh(), path)
    msg = str(e.value)
    assert str(path) in msg and "layout: authors" in msg
    assert "unexpected" in msg and "stages.0.blocks.2.norm1.weight (file: network.0.2.norm1.weight)" in msg
    assert "more)" in msg  # long lists are truncated with a count
    assert "poolformer_s24" in msg

    path = write(dict(s12.state_dict()), tmp_path / "s12.pth")
    with pytest.raises(WeightsError) as e:
        load_weights(s24, path)
    assert "missing" in str(e.value) and "stages.0.blocks.2.norm1.weight" in str(e.value)
    assert "looks like poolformer_s12" in str(e.value)


def test_shape_mismatch_lists_shapes(s12, tmp_path):
    path = write(dict(s12.state_dict()), tmp_path / "s12.pth")
    with pytest.raises(WeightsError) as e:
        load_weights(fresh(dims=[48, 96, 192, 384]), path)
    msg = str(e.value)
    assert "shape mismatch" in msg and "stem.conv.weight [64, 3, 7, 7] in file vs [48, 3, 7, 7] in model" in msg
    assert "looks like poolformer_s12" in msg


def test_unknown_layout(tmp_path):
    path = write({"features.0.weight": torch.zeros(3), "classifier.1.weight": torch.zeros(2, 3)},
                 tmp_path / "resnet.pth")
    with pytest.raises(WeightsError, match="unknown key layout") as e:
        load_weights(fresh(), path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("name", ["random.pth", "random.safetensors", "random.bin"])
def test_corrupt_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(os.urandom(4096))
    with pytest.raises(WeightsError, match="corrupt") as e:
        load_weights(fresh(), path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
def test_truncated_file(s12, tmp_path, fmt):
    path = tmp_path / ("s12.safetensors" if fmt == "safetensors" else "s12.pth")
    write(dict(s12.state_dict()), path, fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="truncated") as e:
        load_weights(fresh(), path)
    assert str(path) in str(e.value)


def test_missing_file_directory_and_empty_file(tmp_path):
    with pytest.raises(WeightsError, match="no such file"):
        load_weights(fresh(), tmp_path / "nope.pth")
    with pytest.raises(WeightsError, match="is a folder, not a weights file"):
        load_weights(fresh(), tmp_path)
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(WeightsError, match="empty"):
        load_weights(fresh(), tmp_path / "empty.pth")


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("how", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_refused(tmp_path, how):
    marker, control = tmp_path / "pwned", tmp_path / "control"
    path, control_path = tmp_path / "evil.pth", tmp_path / "control.pth"
    for p, m in ((path, marker), (control_path, control)):
        obj = {"state_dict": {"stem.conv.weight": torch.zeros(1)}, "extra": _Payload(m)}
        if how == "torch.save":
            torch.save(obj, p)
        else:
            with open(p, "wb") as f:
                pickle.dump(obj, f)
    # The control file really does run code when unpickled without weights_only.
    if how == "torch.save":
        torch.load(control_path, weights_only=False)
    else:
        with open(control_path, "rb") as f:
            pickle.load(f)
    assert control.exists()
    with pytest.raises(WeightsError, match="refused") as e:
        load_weights(fresh(), path)
    assert str(path) in str(e.value)
    assert not marker.exists()


# ----- expected differences -----------------------------------------------------------------

def test_other_num_classes_reinitialises_only_the_classifier(s12, tmp_path):
    path = write(to_authors(s12), tmp_path / "s12.pth")
    model = fresh(num_classes=10)
    with torch.no_grad():
        model.head.fc.weight.fill_(7.0)
        model.head.fc.bias.fill_(7.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = load_weights(model, path)
    msgs = [str(w.message) for w in caught if "classifier" in str(w.message)]
    assert len(msgs) == 1 and "1000" in msgs[0] and "10 classes" in msgs[0]
    assert sorted(report.reinitialised) == ["head.fc.bias", "head.fc.weight"]
    assert model.head.fc.weight.shape == (10, 512)
    assert torch.all(model.head.fc.bias == 0) and model.head.fc.weight.abs().max() < 0.1  # trunc_normal(.02)
    theirs = s12.state_dict()
    for k, v in model.state_dict().items():
        if not k.startswith("head.fc."):
            assert torch.equal(v, theirs[k]), k


def test_in_chans_1_adapts_the_stem(s12, tmp_path):
    path = write(to_huggingface(s12), tmp_path / "hf.safetensors", "safetensors")
    model = fresh(in_chans=1)
    report = load_weights(model, path)
    assert report.adapted and "stem.conv.weight" in report.adapted[0]
    assert torch.allclose(model.stem.conv.weight, s12.stem.conv.weight.sum(1, keepdim=True))
    assert torch.equal(model.stages[1].downsample.conv.weight, s12.stages[1].downsample.conv.weight)
    with torch.no_grad():  # a grey image as 1 channel == the same image as 3 equal channels
        grey = X[:, :1]
        assert torch.allclose(model(grey), s12(grey.expand(-1, 3, -1, -1)), atol=1e-4)


def test_features_only_drops_the_head(s12, tmp_path):
    path = write(to_authors(s12), tmp_path / "s12.pth.tar")
    model = fresh(features_only=True)
    norms_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("feature_norms.")}
    report = load_weights(model, path)
    assert sorted(report.dropped) == ["head.fc.bias", "head.fc.weight", "head.norm.bias", "head.norm.weight"]
    assert report.ok and sorted(report.reinitialised) == sorted(norms_before)
    sd, theirs = model.state_dict(), s12.state_dict()
    for k, v in sd.items():
        if k.startswith("feature_norms."):
            assert torch.equal(v, norms_before[k])
        else:
            assert torch.equal(v, theirs[k]), k
    with torch.no_grad():
        for a, raw, norm in zip(model(X), s12.forward_intermediates(X, intermediates_only=True), model.feature_norms):
            assert torch.equal(a, norm(raw))


def test_strict_false_loads_what_fits(s12, tmp_path):
    sd = dict(s12.state_dict())
    sd.pop("stages.3.blocks.1.mlp.fc2.bias")
    path = write(sd, tmp_path / "partial.pth")
    with pytest.raises(WeightsError, match="stages.3.blocks.1.mlp.fc2.bias"):
        load_weights(fresh(), path)
    model = fresh()
    report = load_weights(model, path, strict=False)
    assert report.missing == ["stages.3.blocks.1.mlp.fc2.bias"]
    assert torch.equal(model.stem.conv.weight, s12.stem.conv.weight)


# ----- sources: URLs and create_model ----------------------------------------------------------

def test_url_is_downloaded_once_into_the_cache(s12, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("METAFORMER_CACHE", str(cache))
    src = write(to_authors(s12), tmp_path / "poolformer_s12.pth.tar")
    url = src.as_uri()
    model = metaformer.create_model("poolformer_s12", pretrained=url)
    assert (cache / "poolformer_s12.pth.tar").is_file()
    assert torch.equal(model.stem.conv.weight, s12.stem.conv.weight)
    src.unlink()  # the second load must come from the cache
    assert load_weights(fresh(), url).ok


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """poolformer_s12's release file at an address that refuses connections (as offline: at once), and an empty
    cache folder that does not exist yet."""
    import dataclasses

    from metaformer.zoo.registry import _REGISTRY

    cache = tmp_path / "cache" / "metaformer"
    monkeypatch.setenv("METAFORMER_CACHE", str(cache))
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    info = _REGISTRY["poolformer_s12"]
    weights = dataclasses.replace(info.weights[0], url="http://127.0.0.1:9/poolformer_s12.pth.tar")
    monkeypatch.setitem(_REGISTRY, "poolformer_s12", dataclasses.replace(info, weights=(weights,)))
    return cache


def test_offline_download_says_where_to_put_the_file_on_every_path(offline, tmp_path, capsys):
    """Offline, timm's and metaformer's pretrained=True and the command line each fail at once (timm does not retry
    its Hub copy) with one line naming the cache file to copy in and their own way to pass a file (the command line
    its flag); no empty cache folder is left. The file copied into the cache is what both paths then load, with no
    network."""
    import time

    import timm

    paths = {
        "timm": (lambda: timm.create_model("metaformer_poolformer_s12.sail_in1k", pretrained=True),
                 "pass its path: pretrained_cfg_overlay=dict(file='/path/to/poolformer_s12.pth.tar')"),
        "metaformer": (lambda: metaformer.create_model("poolformer_s12", pretrained=True),
                       "pass its path: pretrained='/path/to/poolformer_s12.pth.tar'"),
    }
    for name, (load, how) in paths.items():
        t0 = time.time()
        with pytest.raises(WeightsError) as e:
            load()
        assert time.time() - t0 < 10, name
        text = str(e.value)
        assert "\n" not in text and how in text, (name, text)
        assert f"copy it to {offline / 'poolformer_s12.pth.tar'}" in text, (name, text)
        assert not offline.exists() and not offline.parent.exists(), name
    assert main(["eval", "poolformer_s12", "--data", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "pass its path: --checkpoint /path/to/poolformer_s12.pth.tar" in err, err
    assert main(["train", "--pretrained", "poolformer_s12", "--output", str(tmp_path / "run"), "--epochs", "1",
                 "--img-size", "32"]) == 2
    err = capsys.readouterr().err
    assert "pass its path: --pretrained /path/to/poolformer_s12.pth.tar" in err, err
    assert not (tmp_path / "run").exists()  # the run never started: no folder left

    s12 = metaformer.create_model("poolformer_s12")
    offline.mkdir(parents=True)
    torch.save(to_authors(s12), offline / "poolformer_s12.pth.tar")  # copied in by hand
    via_timm = timm.create_model("metaformer_poolformer_s12.sail_in1k", pretrained=True)
    via_metaformer = metaformer.create_model("poolformer_s12", pretrained=True)
    for model in (via_timm, via_metaformer):
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), s12.state_dict().values()))


def test_variant_without_published_weights():
    with pytest.raises(WeightsError, match="no published weights"):
        metaformer.create_model("metaformer_pppf_s12", pretrained=True, img_size=64)


# ----- saving --------------------------------------------------------------------------------

def test_save_and_load_model_round_trip(s12, tmp_path):
    path = tmp_path / "out" / "s12.safetensors"
    save_weights(s12, path, class_names=[f"c{i}" for i in range(1000)], extra={"epoch": 300, "top1": 77.2})
    assert [p.name for p in path.parent.iterdir()] == ["s12.safetensors"]  # no temp file left behind
    meta = read_metadata(path)
    assert meta["variant"] == "poolformer_s12" and meta["extra"] == {"epoch": 300, "top1": 77.2}
    assert meta["class_names"][:2] == ["c0", "c1"]
    model = load_model(path).eval()
    assert model.variant == "poolformer_s12" and model.class_names[999] == "c999"
    assert json.loads(json.dumps(model.config)) == json.loads(json.dumps(s12.config))
    assert_same_tensors(model.state_dict(), s12.state_dict())
    with torch.no_grad():
        assert torch.equal(model(X), s12(X))


def test_saved_overrides_rebuild_the_same_model(tmp_path):
    src = randomised(metaformer.create_model("poolformer_s12", token_mixers="dwconv", pool_size=5, num_classes=7,
                                             **SMALL))
    path = save_weights(src, tmp_path / "dw5.safetensors")
    model = load_model(path).eval()
    assert model.config["token_mixers"] == "dwconv" and model.config["pool_size"] == 5
    assert model.config["dims"] == SMALL["dims"] and model.config["depths"] == SMALL["depths"]
    assert model.stages[0].blocks[0].token_mixer.conv.kernel_size == (5, 5) and model.num_classes == 7
    with torch.no_grad():
        assert torch.equal(model(X), src(X))

    pooled = randomised(metaformer.create_model("poolformer_s12", pool_size=5, **SMALL))
    path = save_weights(pooled, tmp_path / "pool5.safetensors")
    rebuilt = load_model(path).eval()
    assert rebuilt.stages[0].blocks[0].token_mixer.pool_size == 5  # parameter-free, so only the config knows
    with torch.no_grad():
        assert torch.equal(rebuilt(X), pooled(X))
    with pytest.warns(UserWarning, match="pool_size=5"):  # same keys, different model: say so
        load_weights(fresh(**SMALL), path)


def test_load_model_overrides(s12, tmp_path):
    path = save_weights(s12, tmp_path / "s12.safetensors")
    with pytest.warns(UserWarning, match="classifier"):
        model = load_model(path, num_classes=5)
    assert model.num_classes == 5 and model.class_names is None
    assert torch.equal(model.stem.conv.weight, s12.stem.conv.weight)


def test_unregistered_mixer_cannot_be_saved_registered_one_can(tmp_path):
    class Unregistered(nn.Module):
        def __init__(self, dim):
            super().__init__()

        def forward(self, x):
            return x

    model = metaformer.create_model("poolformer_s12", token_mixers=Unregistered, **SMALL)
    with pytest.raises(WeightsError, match="register_token_mixer"):
        save_weights(model, tmp_path / "x.safetensors")
    assert not list(tmp_path.iterdir())

    @metaformer.register_token_mixer("test_weights_halving")
    class Halving(nn.Module):
        def __init__(self, dim):
            super().__init__()

        def forward(self, x):
            return 0.5 * x

    src = randomised(metaformer.create_model("poolformer_s12", token_mixers=Halving, **SMALL))
    path = save_weights(src, tmp_path / "halving.safetensors")
    assert read_metadata(path)["config"]["token_mixers"] == "test_weights_halving"
    model = load_model(path).eval()
    assert isinstance(model.stages[0].blocks[0].token_mixer, Halving)
    with torch.no_grad():
        assert torch.equal(model(X), src(X))


def test_read_metadata_rejects_foreign_safetensors(s12, tmp_path):
    path = write(dict(s12.state_dict()), tmp_path / "plain.safetensors", "safetensors")
    with pytest.raises(WeightsError, match="without metaformer metadata"):
        read_metadata(path)
