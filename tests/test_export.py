"""Export round trips with parity, hub-style folders, torch.hub, Grad-CAM."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import metaformer
from metaformer.cli import main
from metaformer.tools.export import ExportError, export, sample_image
from metaformer.tools.exported import load_runtime
from metaformer.tools.hub import from_pretrained, save_pretrained

REPO = Path(__file__).resolve().parents[1]


def model64(name, **kw):
    torch.manual_seed(0)
    return metaformer.create_model(name, img_size=64, num_classes=10, **kw).eval()


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "exported"])
@pytest.mark.parametrize("name", ["poolformer_s12", "metaformer_ppaa_s12"])
def test_export_round_trip_parity(tmp_path, fmt, name, fused):
    model = model64(name)
    info = metaformer.get_model_info(name)
    image = sample_image(info.transforms(64))
    # the portable fused backend is what `metaformer export --fused` writes
    exported = metaformer.fuse(model, backend="aten") if fused else model
    result = export(exported, tmp_path / "m", fmt, image=image, dynamic_batch=True)
    assert result.path.suffix == {"onnx": ".onnx", "torchscript": ".pt", "exported": ".pt2"}[fmt]
    assert result.ok and result.max_diff_random <= 1e-4 and result.max_diff_image <= 1e-4
    # the file alone, in its runtime, reproduces the model on a fresh input at another batch size
    run = load_runtime(result.path)
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        assert (run(x) - model(x)).abs().max() < 1e-4


def test_dynamic_size_export_runs_at_other_sizes(tmp_path):
    model = model64("poolformer_s12")
    result = export(model, tmp_path / "dyn.onnx", "onnx", dynamic_batch=True, dynamic_size=True)
    run = load_runtime(result.path)
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        assert (run(x) - model(x)).abs().max() < 1e-4


def test_dynamic_size_with_size_bound_mixer_is_a_clear_error(tmp_path):
    for name in ["metaformer_pppf_s12", "metaformer_ppaa_s12"]:
        with pytest.raises(ExportError, match="--dynamic-size cannot work for this model"):
            export(model64(name), tmp_path / "x", "onnx", dynamic_size=True)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_low_precision_export_is_checked_against_fp32(tmp_path):
    model = model64("poolformer_s12")
    result = export(model, tmp_path / "bf16", "exported", dtype="bf16")
    assert 0 < result.max_diff_random <= 5e-2  # not bit-identical to fp32, but close
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is untouched
    with pytest.raises(ExportError, match="bfloat16"):
        export(model, tmp_path / "bf16", "onnx", dtype="bf16")


def test_export_cli_verifies_and_writes(tmp_path, capsys):
    ckpt = tmp_path / "s12.safetensors"
    metaformer.save_weights(model64("poolformer_s12"), ckpt, class_names=[f"c{i}" for i in range(10)])
    out = tmp_path / "s12.onnx"
    assert main(["export", "poolformer_s12", "--checkpoint", str(ckpt), "--format", "onnx", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert out.is_file() and "real image" in text and "top-1 agrees: True" in text
    assert main(["export", "poolformer_s12", "--checkpoint", str(ckpt), "--format", "onnx", "--dtype", "bf16",
                 "-o", str(tmp_path / "x.onnx")]) == 2
    assert "bfloat16" in capsys.readouterr().err


def test_export_writes_any_batch_by_default_and_a_fixed_batch_file_still_runs_any_batch(tmp_path, capsys):
    ckpt = tmp_path / "s12.safetensors"
    model = model64("poolformer_s12", depths=[1, 1, 1, 1], dims=[8, 8, 16, 16])
    metaformer.save_weights(model, ckpt, class_names=[f"c{i}" for i in range(10)])
    photos = []
    for i in range(3):
        photos.append(tmp_path / f"p{i}.png")
        Image.fromarray((np.random.default_rng(i).random((64, 64, 3)) * 255).astype("uint8")).save(photos[-1])
    for fmt in ("onnx", "exported"):
        dynamic, fixed = tmp_path / f"any.{fmt}", tmp_path / f"one.{fmt}"
        assert main(["export", "--checkpoint", str(ckpt), "--format", fmt, "-o", str(dynamic)]) == 0
        assert main(["export", "--checkpoint", str(ckpt), "--format", fmt, "--no-dynamic-batch",
                     "-o", str(fixed)]) == 0
        capsys.readouterr()
        assert load_runtime(next(tmp_path.glob(f"any.{fmt}*"))).fixed_batch is None
        one = load_runtime(next(tmp_path.glob(f"one.{fmt}*")))
        assert one.fixed_batch == 1 and "images run 1 per call" in one.batching
        x = torch.randn(3, 3, 64, 64)
        with torch.no_grad():
            assert (one(x) - model(x)).abs().max() < 1e-4
        answers = []
        for path in (dynamic, fixed):
            path = next(tmp_path.glob(f"{path.name}*"))
            assert main(["predict", "--exported", str(path), *map(str, photos), "--json"]) == 0
            answers.append(json.loads(capsys.readouterr().out))
        for a, b in zip(*answers):
            assert [n for n, _ in a["predictions"]] == [n for n, _ in b["predictions"]]
            assert max(abs(p - q) for (_, p), (_, q) in zip(a["predictions"], b["predictions"])) < 1e-5


def test_export_output_naming_a_folder_writes_inside_it(tmp_path, capsys):
    ckpt = tmp_path / "s12.safetensors"
    metaformer.save_weights(model64("poolformer_s12", depths=[1, 1, 1, 1], dims=[8, 8, 16, 16]), ckpt)
    (tmp_path / "existing").mkdir()
    for out, written in ((tmp_path / "existing", tmp_path / "existing" / "model.onnx"),
                         (f"{tmp_path / 'new'}/", tmp_path / "new" / "poolformer_s12.pt")):
        fmt = ["--format", "torchscript", "poolformer_s12"] if str(out).endswith("/") else []
        assert main(["export", "--checkpoint", str(ckpt), *fmt, "-o", str(out)]) == 0
        assert f"wrote {written} " in capsys.readouterr().out and written.is_file()
    assert not list(tmp_path.glob("*.onnx")) and not list(tmp_path.glob("*.pt"))


def test_save_and_from_pretrained_folder_round_trip(tmp_path):
    model = model64("metaformer_pppf_s12", pool_size=5)
    names = [f"class_{i}" for i in range(10)]
    folder = save_pretrained(model, tmp_path / "hub", class_names=names)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    loaded = from_pretrained(folder).eval()
    assert loaded.class_names == names
    assert loaded.stages[0].blocks[0].token_mixer.pool_size == 5
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_from_pretrained_errors_are_clear(tmp_path):
    with pytest.raises(metaformer.WeightsError, match="config.json is missing"):
        (tmp_path / "empty").mkdir()
        from_pretrained(tmp_path / "empty")
    with pytest.raises(metaformer.WeightsError, match="no such folder"):
        from_pretrained(tmp_path / "nope" / "deeper")
    # a hub id on an offline machine (or without huggingface_hub): one clear line, no traceback
    with pytest.raises(metaformer.WeightsError, match="hub|huggingface_hub"):
        from_pretrained("metaformer-test-nonexistent/poolformer")


def test_torch_hub_load_from_repository():
    model = torch.hub.load(str(REPO), "poolformer_s12", source="local", num_classes=3, img_size=64)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)
    # torch.hub.list only reads GitHub; every registered variant is an entry point of hubconf.py
    hubconf = torch.hub._import_module("hubconf", str(REPO / "hubconf.py"))
    assert all(callable(getattr(hubconf, n, None)) for n in metaformer.list_models())


def test_grad_cam_on_a_real_photo(tmp_path):
    skdata = pytest.importorskip("skimage.data")
    from metaformer.tools.cam import grad_cam, save_overlay

    photo = Image.fromarray(skdata.chelsea())
    model = model64("poolformer_s12")
    tf = metaformer.get_model_info("poolformer_s12").transforms(64)
    a = grad_cam(model, photo, tf, target=1)
    b = grad_cam(model, photo, tf, target=7)
    for r in (a, b):
        assert r.heatmap.shape == (64, 64) and np.isfinite(r.heatmap).all()
        assert r.heatmap.max() > 0  # not a blank map
        row, col = r.peak
        assert 0 <= row < 64 and 0 <= col < 64
        assert r.overlay.shape == (64, 64, 3) and r.overlay.dtype == np.uint8
    assert np.abs(a.heatmap - b.heatmap).max() > 1e-3  # the map depends on the target class
    png = save_overlay(a, tmp_path)
    assert Image.open(png).size == (64, 64)


def test_grad_cam_on_a_hybrid_and_the_cli(tmp_path, capsys):
    skdata = pytest.importorskip("skimage.data")
    ckpt = tmp_path / "h.safetensors"
    metaformer.save_weights(model64("metaformer_ppaa_s12"), ckpt, class_names=[f"c{i}" for i in range(10)])
    photo = tmp_path / "cat.jpg"
    Image.fromarray(skdata.chelsea()).save(photo)
    assert main(["cam", "metaformer_ppaa_s12", str(photo), "--checkpoint", str(ckpt), "--target", "c4",
                 "--output", str(tmp_path / "cams")]) == 0
    assert "class 4 (c4" in capsys.readouterr().out
    assert len(list((tmp_path / "cams").glob("*.png"))) == 1
    assert main(["cam", "metaformer_ppaa_s12", str(photo), "--checkpoint", str(ckpt), "--target", "dog"]) == 2
    assert "unknown target class 'dog'" in capsys.readouterr().err


def test_predict_with_exported_onnx_matches_pytorch_and_fused(tmp_path, capsys):
    skdata = pytest.importorskip("skimage.data")
    names = [f"class_{i}" for i in range(10)]
    ckpt = tmp_path / "s12.safetensors"
    metaformer.save_weights(model64("poolformer_s12"), ckpt, class_names=names)
    photo = tmp_path / "cat.png"
    Image.fromarray(skdata.chelsea()).save(photo)
    onnx_file = tmp_path / "s12.onnx"
    assert main(["export", "poolformer_s12", "--checkpoint", str(ckpt), "-o", str(onnx_file)]) == 0
    capsys.readouterr()

    def predictions(*extra):
        assert main(["predict", str(photo), "--checkpoint", str(ckpt), "--topk", "3", "--json", *extra]) == 0
        return json.loads(capsys.readouterr().out)[0]["predictions"]

    plain = predictions()
    for other in (predictions("--exported", str(onnx_file)), predictions("--fused")):
        assert [n for n, _ in other] == [n for n, _ in plain]
        assert all(n.startswith("class_") for n, _ in other)  # the checkpoint's own class names
        assert max(abs(p - q) for (_, p), (_, q) in zip(other, plain)) < 1e-5


def test_cam_on_a_small_input_model_looks_at_a_stage_that_can_localise(tmp_path, capsys):
    """At 32 px the last stage's map is 1x1 (a flat overlay): cam takes the deepest stage of at least 4x4, and says
    so, as serve does."""
    from metaformer.tools.cam import cam_stage_for, grad_cam

    ckpt = tmp_path / "tiny.safetensors"
    torch.manual_seed(0)
    model = metaformer.create_model("poolformer_s12", img_size=32, num_classes=3)
    metaformer.save_weights(model, ckpt)
    photo = tmp_path / "x.png"
    Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype("uint8")).save(photo)
    assert main(["cam", "poolformer_s12", str(photo), "--checkpoint", str(ckpt), "--output", str(tmp_path),
                 "--json"]) == 0
    out, err = capsys.readouterr()
    assert "Grad-CAM on stage 2 (4x4 map): at 32 px the last stage's map is 1x1" in err
    assert cam_stage_for(model)[0] == 1
    transform = metaformer.get_model_info("poolformer_s12").transforms(32)
    with Image.open(photo) as im:
        heat = grad_cam(model.eval(), im.convert("RGB"), transform, stage=1).heatmap
    assert heat.std() > 0.01  # the 4x4 map localises; the 1x1 map gave a constant
    # at a size that is not a multiple of 32 the maps are the network's own (56 px: 14, 7, 4, 2), not img_size // stride
    odd = metaformer.create_model("poolformer_s12", img_size=56, depths=[1, 1, 1, 1], dims=[8, 16, 24, 32])
    assert cam_stage_for(odd) == (2, "Grad-CAM on stage 3 (4x4 map): at 56 px the last stage's map is 2x2, too "
                                     "coarse to localise")


def test_exported_fused_model_is_written_without_torch_warnings(tmp_path, capsys):
    """`export --format exported --fused` writes the .pt2 file without a warning (torch's .pt2 writer warns "No
    complete tensor found in the group!" on channels_last weights such as the fused convs')."""
    import warnings

    import metaformer
    from metaformer.cli import main

    model = metaformer.create_model("poolformer_s12", depths=[1, 1, 1, 1], dims=[8, 8, 16, 16], num_classes=10,
                                    img_size=32)
    metaformer.save_weights(model, tmp_path / "tiny.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the export
        assert main(["export", "--checkpoint", str(tmp_path / "tiny.safetensors"), "--format", "exported", "--fused",
                     "-o", str(tmp_path / "f.pt2")]) == 0
    out, err = capsys.readouterr()
    assert "wrote" in out and "warning" not in err, err
