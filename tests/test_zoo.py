"""The zoo: architectures and their tagged weights as data, downloads checked by sha256, the model
owning its config."""
import dataclasses
import json

import pytest
import torch

import metaformer
from metaformer.weights import WeightsError, from_ours
from metaformer.zoo import registry


def test_tags_default_weights_and_names():
    assert "poolformer_s12.sail_in1k" in metaformer.list_pretrained("poolformer_*")
    w = metaformer.get_weights("poolformer_s12")  # the default tag
    assert w.tag == "sail_in1k" and w.url.endswith("poolformer_s12.pth.tar") and w.top1 == 77.2
    assert w.hf_hub_id == "timm/poolformer_s12.sail_in1k" and w.crop_pct == 0.9
    assert len(w.categories) == 1000 and w.categories[0] == "tench"
    with torch.device("meta"):
        model = metaformer.create_model("poolformer_m36.sail_in1k")
    assert model.pretrained_cfg["tag"] == "sail_in1k" and model.pretrained_cfg["crop_pct"] == 0.95
    with torch.device("meta"):  # timm's name for ours works here too
        assert metaformer.create_model("metaformer_poolformer_s12").variant == "poolformer_s12"
    with pytest.raises(WeightsError, match="no weights tagged 'in22k'.*poolformer_s12.sail_in1k"):
        metaformer.get_weights("poolformer_s12.in22k")


def test_every_tag_builds_its_classifier_and_input_size():
    for name in metaformer.list_pretrained():
        w = metaformer.get_weights(name)
        with torch.device("meta"):
            model = metaformer.create_model(name)
        assert model.num_classes == w.num_classes == len(w.categories), name
        assert model.pretrained_cfg["input_size"] == (3, w.img_size, w.img_size), name
        assert w.url and w.url.startswith("https://"), name


@pytest.fixture
def published(tmp_path, monkeypatch):
    """poolformer_s12's release URL pointed at a local file in the authors' layout (no network in tests)."""
    torch.manual_seed(0)
    source = metaformer.create_model("poolformer_s12").eval()
    path = tmp_path / "release" / "poolformer_s12.pth.tar"
    path.parent.mkdir()
    torch.save(from_ours(source.state_dict(), "authors"), path)
    info = registry._REGISTRY["poolformer_s12"]
    w = dataclasses.replace(info.weights[0], url=path.as_uri())
    monkeypatch.setitem(registry._REGISTRY, "poolformer_s12", dataclasses.replace(info, weights=(w,)))
    monkeypatch.setenv("METAFORMER_CACHE", str(tmp_path / "cache"))
    return source, path, tmp_path / "cache"


def test_pretrained_downloads_once_records_its_sha256_and_redownloads_a_changed_file(published):
    from metaformer.weights.io import file_sha256

    source, path, cache = published
    model = metaformer.create_model("poolformer_s12", pretrained=True)
    cached = cache / "poolformer_s12.pth.tar"
    record = json.loads((cache / "poolformer_s12.pth.tar.sha256.json").read_text())
    assert record["sha256"] == file_sha256(path) and record["url"] == path.as_uri()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), source(x))
    cached.write_bytes(cached.read_bytes()[:-10] + b"0123456789")  # corrupted in the cache
    metaformer.create_model("poolformer_s12", pretrained=True)  # noticed, downloaded again, loads
    assert file_sha256(cached) == record["sha256"]


def test_every_architecture_and_tag_is_described_alike_by_both_entry_points():
    """One pretrained_cfg per architecture and tag (ModelInfo.pretrained_cfg): timm's registry holds it, and a model
    built for it by metaformer.create_model carries the same entries (timm names the architecture with its prefix)."""
    import timm

    names = metaformer.list_pretrained() + [n for n in metaformer.list_models()
                                            if not metaformer.get_model_info(n).weights]
    for name in names:
        with torch.device("meta"):
            ours = dict(metaformer.create_model(name).pretrained_cfg)
        registered = timm.models.get_pretrained_cfg(metaformer.zoo.timm_name(name)).to_dict()
        assert registered.pop("architecture") == metaformer.zoo.timm_name(ours.pop("architecture")), name
        assert registered.pop("tag", None) == ours.pop("tag", None), name
        registered.pop("custom_load")  # timm's own field, False
        assert ours == registered, name
    with torch.device("meta"):  # timm's entry point: the registered cfg
        for name in ("metaformer_caformer_s18.sail_in22k_ft_in1k_384", "metaformer_ppaa_s12"):
            model = timm.create_model(name)
            assert model.pretrained_cfg == timm.models.get_pretrained_cfg(name).to_dict(), name


def test_both_entry_points_download_the_release_file_into_cache_dir(published, tmp_path):
    """pretrained=True with cache_dir: the authors' release file is kept in cache_dir, through timm's entry point
    as through metaformer's (both read timm's creation arguments with the same functions)."""
    import timm

    source, _, default_cache = published
    for entry, build in {"metaformer": lambda d: metaformer.create_model("poolformer_s12", pretrained=True,
                                                                         cache_dir=str(d)),
                         "timm": lambda d: timm.create_model("metaformer_poolformer_s12", pretrained=True,
                                                             cache_dir=str(d))}.items():
        cache = tmp_path / f"cache-{entry}"
        model = build(cache)
        assert (cache / "poolformer_s12.pth.tar").is_file(), entry
        assert torch.equal(model.stem.conv.weight, source.stem.conv.weight), entry
    assert not default_cache.exists()


def test_a_published_checksum_that_does_not_match_keeps_nothing(published, monkeypatch):
    _, _, cache = published
    info = registry._REGISTRY["poolformer_s12"]
    w = dataclasses.replace(info.weights[0], sha256="0" * 64)
    monkeypatch.setitem(registry._REGISTRY, "poolformer_s12", dataclasses.replace(info, weights=(w,)))
    with pytest.raises(WeightsError, match="not the published 0000"):
        metaformer.create_model("poolformer_s12", pretrained=True)
    assert not (cache / "poolformer_s12.pth.tar").exists()


def test_a_directly_built_model_owns_its_config_and_rebuilds_exactly(tmp_path):
    model = metaformer.MetaFormer(depths=[1, 2], dims=[16, 32], token_mixers=["pooling", "attention"], norm="ln",
                                  head_dim=16, num_classes=4, img_size=64, act="starrelu", mlp_bias=False)
    model.reset_classifier(3)
    assert model.config["num_classes"] == 3 and model.pretrained_cfg["num_classes"] == 3
    metaformer.save_weights(model, tmp_path / "m.safetensors")
    again = metaformer.load_model(tmp_path / "m.safetensors")
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(again.eval()(x), model.eval()(x), rtol=0, atol=0)
    assert again.config == json.loads(json.dumps(model.config))


def test_every_tag_downloads_the_file_docs_install_md_names():
    """docs/install.md says which file each tag downloads from where; every tag's URL is the one it names."""
    import fnmatch
    import itertools
    import re
    from pathlib import Path

    import metaformer

    def expand(pattern: str) -> list[str]:  # "{a,b}_x" -> ["a_x", "b_x"]
        parts = re.split(r"\{([^{}]*,[^{}]*)\}", pattern)
        options = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
        return ["".join(c) for c in itertools.product(*options)]

    text = (Path(__file__).resolve().parents[1] / "docs" / "install.md").read_text()
    rows = re.findall(r"^\| `([^`]+)` \| `(https://[^`]+)` \|$", text, flags=re.M)
    assert len(rows) == 7
    for tag in metaformer.list_pretrained():
        variant, _ = tag.split(".")
        matches = [url for pattern, url in rows if any(fnmatch.fnmatchcase(tag, p) for p in expand(pattern))]
        assert len(matches) == 1, (tag, matches)
        family = metaformer.get_model_info(variant).family
        assert matches[0].format(name=variant, family=family) == metaformer.get_weights(tag).url, tag
