"""`metaformer convert`: any layout we read, written in another, checked by its logits before it is kept."""
import json

import pytest
import torch

import metaformer
from metaformer.cli import main
from metaformer.tools import convert as C
from metaformer.weights import from_ours

SMALL = dict(depths=[1, 1, 2, 1], dims=[32, 64, 96, 128], img_size=64)


@pytest.fixture(scope="module")
def authors_file(tmp_path_factory):
    """A small PoolFormer in the authors' release layout, with non-trivial weights everywhere."""
    torch.manual_seed(0)
    model = metaformer.MetaFormer(**SMALL, num_classes=5).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path_factory.mktemp("src") / "small.pth"
    torch.save(from_ours(model.state_dict(), "authors"), path)
    return path, model


def logits(model, x):
    with torch.no_grad():
        return model(x)


def test_to_hugging_face_loads_in_transformers_with_equal_logits(authors_file, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    path, model = authors_file
    out = tmp_path / "hf"
    assert main(["convert", str(path), str(out), "--to", "hf", "--model", "poolformer_s12", "--img-size", "64",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["checked_in"] == ["metaformer", "transformers"] and result["max_relative_diff"] <= 1e-5
    hf = transformers.PoolFormerForImageClassification.from_pretrained(str(out)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, logits(model, x), rtol=1e-5, atol=1e-5)
    assert hf.config.num_labels == 5


@pytest.mark.parametrize("to", ["timm", "authors", "ours"])
def test_round_trips_give_the_same_logits(authors_file, tmp_path, to):
    path, model = authors_file
    dst = tmp_path / ("m.safetensors" if to == "ours" else "m.pth")
    result = C.convert(str(path), dst, to, model_name="poolformer_s12", img_size=64)
    assert result.max_diff == 0.0 and dst.is_file()
    back = metaformer.create_model("poolformer_s12", num_classes=5, **SMALL)
    report = metaformer.load_weights(back, dst)
    assert report.layout == {"timm": "timm", "authors": "authors", "ours": "metaformer"}[to]
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(logits(back.eval(), x), logits(model, x))


def test_timm_layout_is_checked_in_timm_itself(tmp_path):
    """A full-size S12 goes into timm's own poolformer_s12 strictly, with equal stage features."""
    torch.manual_seed(0)
    model = metaformer.create_model("poolformer_s12", num_classes=10)
    src = tmp_path / "ours.safetensors"
    metaformer.save_weights(model, src)
    result = C.convert(str(src), tmp_path / "timm.pth", "timm")
    assert result.checked_in == ["metaformer", "timm (features)"] and result.max_diff <= 1e-5


def test_a_conversion_that_changes_the_numbers_writes_nothing(authors_file, tmp_path, monkeypatch):
    path, _ = authors_file
    real = C.from_ours

    def corrupt(sd, layout):
        out = real(sd, layout)
        key = next(k for k in out if k.endswith("mlp.fc1.weight") or k.endswith("output.conv1.weight")
                   or k.endswith(".fc1.weight"))
        out[key] = out[key] * 1.5
        return out

    monkeypatch.setattr(C, "from_ours", corrupt)
    with pytest.raises(C.ConvertError, match="other logits .* nothing was written"):
        C.convert(str(path), tmp_path / "bad.pth", "timm", model_name="poolformer_s12", img_size=64)
    assert not (tmp_path / "bad.pth").exists() and not list(tmp_path.glob(".bad.pth*"))


def test_clear_errors(authors_file, tmp_path, capsys):
    path, _ = authors_file
    assert main(["convert", str(path), str(tmp_path / "x.pth"), "--to", "timm"]) == 2
    assert "cannot tell which model this is (no registered variant has its layers); name the variant" \
        in capsys.readouterr().err
    hybrid = metaformer.create_model("metaformer_ppaa_s12", **SMALL)
    metaformer.save_weights(hybrid, tmp_path / "h.safetensors")
    assert main(["convert", str(tmp_path / "h.safetensors"), str(tmp_path / "hf"), "--to", "hf"]) == 2
    assert "transformers' PoolFormer is PoolFormer v1 only" in capsys.readouterr().err
    (tmp_path / "exists.pth").write_bytes(b"x")
    assert main(["convert", str(tmp_path / "h.safetensors"), str(tmp_path / "exists.pth"), "--to", "timm"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_a_training_checkpoint_keeps_its_config_and_class_names(tmp_path):
    from metaformer.tools.convert import load_source

    model = metaformer.create_model("poolformer_s12", num_classes=3, **SMALL)
    torch.save({"model": model.state_dict(), "model_config": model.config, "variant": "poolformer_s12",
                "class_names": ["a", "b", "c"], "optimizer": {}}, tmp_path / "last.pth")
    C.convert(str(tmp_path / "last.pth"), tmp_path / "out.safetensors", "ours")
    back = metaformer.load_model(tmp_path / "out.safetensors")
    assert back.class_names == ["a", "b", "c"] and back.config["depths"] == SMALL["depths"]
    assert load_source(str(tmp_path / "last.pth"))[1] == "timm"
