"""Ordinary and hostile inputs to eval, predict, export, cam and the weight loader give no silent wrong result:
each test asserts the right number, or a one-line error naming the problem and the fix."""
import json
import os

import numpy as np
import pytest
import torch
from digits import write_digits
from PIL import Image

import metaformer
from metaformer import data as D
from metaformer.cli import main
from metaformer.tasks.inference import load_for_inference

TINY = ["--depths", "1", "1", "1", "1", "--dims", "8", "16", "24", "32", "--batch-size", "128", "--workers", "0"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny digits classifier (3 epochs, far above chance) and the val split as a class folder."""
    root = tmp_path_factory.mktemp("digits")
    assert main(["train", "--output", str(root / "run"), "--epochs", "3", *TINY]) == 0
    return write_digits(root, splits=("val",))


def one_line_error(capsys, *argv) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def eval_json(capsys, *argv) -> dict:
    assert main(["eval", *argv, "--json", "--workers", "0"]) == 0
    return json.loads(capsys.readouterr().out)


def predictions(model, folder, classes):
    """Top-1 of every image under folder/<class>/, scored by class name (the reference for eval)."""
    loaded = load_for_inference(None, str(model))
    hits = total = 0
    for c in classes:
        for f in sorted((folder / c).iterdir()):
            x = loaded.transform(D.open_rgb(f))[None]
            with torch.no_grad():
                hits += loaded.class_names[int(loaded.model(x).argmax())] == c
            total += 1
    return 100 * hits / total, total


# ----------------------------------------------------------------------------- class folders

def test_eval_maps_a_subset_of_classes_by_name(trained, tmp_path, capsys):
    """eval on a folder with only classes 3, 5 and 7 scores them as the model's classes 3, 5 and 7 (by name)."""
    for c in ("3", "5", "7"):
        os.symlink(trained / "val" / c, tmp_path / c)
    expected, n = predictions(trained / "run/best.pth", trained / "val", ["3", "5", "7"])
    result = eval_json(capsys, "--checkpoint", str(trained / "run/best.pth"), "--data", str(tmp_path))
    assert result["images"] == n
    assert result["top1"] == pytest.approx(expected) and expected > 40


def test_eval_maps_a_model_whose_classes_are_in_another_order(trained, tmp_path, capsys):
    """A checkpoint whose class list is permuted (head rows permuted with it) scores exactly the same."""
    loaded = load_for_inference(None, str(trained / "run/best.pth"))
    perm = [3, 9, 0, 7, 1, 8, 2, 6, 4, 5]
    model = loaded.model
    with torch.no_grad():
        model.head.fc.weight.copy_(model.head.fc.weight[perm])
        model.head.fc.bias.copy_(model.head.fc.bias[perm])
    metaformer.save_weights(model, tmp_path / "permuted.safetensors", class_names=[str(i) for i in perm])
    plain = eval_json(capsys, "--checkpoint", str(trained / "run/best.pth"), "--data", str(trained / "val"))
    permuted = eval_json(capsys, "--checkpoint", str(tmp_path / "permuted.safetensors"), "--data",
                         str(trained / "val"))
    assert permuted["top1"] == pytest.approx(plain["top1"]) and plain["top1"] > 40


def test_unknown_class_folders_are_an_error_that_lists_them(trained, tmp_path, capsys):
    for c in ("3", "cat", "dog"):
        (tmp_path / c).mkdir()
        Image.new("RGB", (32, 32)).save(tmp_path / c / "x.png")
    err = one_line_error(capsys, "eval", "--checkpoint", str(trained / "run/best.pth"), "--data", str(tmp_path))
    assert "2 of 3 class folders are not classes of the model: cat, dog" in err


def test_same_count_other_names_is_an_error_not_a_positional_match(trained, tmp_path, capsys):
    loaded = load_for_inference(None, str(trained / "run/best.pth"))
    metaformer.save_weights(loaded.model, tmp_path / "unnamed.safetensors")  # no class names stored
    for i, c in enumerate("abcdefghij"):
        os.symlink(trained / "val" / str(i), tmp_path / c)
    err = one_line_error(capsys, "eval", "--checkpoint", str(tmp_path / "unnamed.safetensors"), "--data",
                         str(tmp_path))
    assert "are not classes of the model" in err and "--positional" in err
    # asked for explicitly, the positional mapping torchvision users know
    result = eval_json(capsys, "--checkpoint", str(tmp_path / "unnamed.safetensors"), "--data", str(tmp_path),
                       "--positional")
    assert result["top1"] > 40


def test_imagenet_wordnet_folders_map_to_a_1000_class_model(tmp_path):
    from metaformer.tasks.inference import class_targets, imagenet_classes

    wnids, names = imagenet_classes()
    assert len(wnids) == len(set(wnids)) == 1000 and wnids == sorted(wnids) and names[0] == "tench"
    assert class_targets(tmp_path, [wnids[5], wnids[2]], names, wnids) == [5, 2]


# ----------------------------------------------------------------------------- symlink loops

def test_a_directory_link_back_into_the_tree_is_not_followed(tmp_path):
    """Directory links back into the tree (a loop, a second way to a class) are skipped with a warning; a link out
    of the tree is followed: each image is listed once, with its class."""
    for c in ("a", "b"):
        (tmp_path / "train" / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8)).save(tmp_path / "train" / c / f"{i}.png")
    os.symlink(tmp_path / "train", tmp_path / "train" / "a" / "loop")
    os.symlink(tmp_path / "train" / "b", tmp_path / "train" / "a" / "b_again")
    (tmp_path / "elsewhere").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "elsewhere" / "extra.png")
    os.symlink(tmp_path / "elsewhere", tmp_path / "train" / "a" / "more")  # outside the tree: followed
    with pytest.warns(UserWarning, match="skipped 2 directory link"):
        ds = D.SafeImageFolder(tmp_path / "train")
    assert sorted((os.path.basename(p), t) for p, t in ds.samples) == sorted(
        [(f"{i}.png", 0) for i in range(3)] + [("extra.png", 0)] + [(f"{i}.png", 1) for i in range(3)])


# ----------------------------------------------------------------------------- 16-bit and float images

def test_16_bit_png_and_float_tiff_decode_by_their_real_range(tmp_path):
    """A 16-bit PNG and float TIFFs (0-1 and 0-255) decode by their real range; values of no known range are
    refused."""
    ramp = np.linspace(0, 1, 64 * 64).reshape(64, 64)
    Image.fromarray((ramp * 65535).astype(np.uint16)).save(tmp_path / "g16.png")
    Image.fromarray(ramp.astype(np.float32)).save(tmp_path / "f.tif")
    Image.fromarray((ramp * 255).astype(np.float32)).save(tmp_path / "f255.tif")
    expected = np.rint(ramp * 255)
    for name in ("g16.png", "f.tif", "f255.tif"):
        img = D.open_rgb(tmp_path / name)
        assert img.mode == "RGB"
        assert np.abs(np.asarray(img)[..., 0].astype(float) - expected).max() <= 1, name
    Image.fromarray(np.full((8, 8), 300.5, np.float32)).save(tmp_path / "odd.tif")
    with pytest.raises(D.DataError, match=r"values in \[300.5, 300.5\], which is neither"):
        D.open_rgb(tmp_path / "odd.tif")  # no known range: refused, not guessed


def test_eval_on_16_bit_pngs_scores_as_on_8_bit(trained, tmp_path, capsys):
    for c in ("1", "4"):
        (tmp_path / "8" / c).mkdir(parents=True)
        (tmp_path / "16" / c).mkdir(parents=True)
        for f in sorted((trained / "val" / c).iterdir())[:15]:
            g = np.asarray(Image.open(f).convert("L"))
            Image.fromarray(g).save(tmp_path / "8" / c / f.name)
            Image.fromarray(g.astype(np.uint16) * 257).save(tmp_path / "16" / c / f.name)
    ckpt = str(trained / "run/best.pth")
    r16 = eval_json(capsys, "--checkpoint", ckpt, "--data", str(tmp_path / "16"))
    r8 = eval_json(capsys, "--checkpoint", ckpt, "--data", str(tmp_path / "8"))
    assert (r16["top1"], r16["loss"], r16["images"]) == (r8["top1"], r8["loss"], r8["images"]) and r8["top1"] > 40


# ----------------------------------------------------------------------------- weights

def test_saved_config_follows_reset_classifier(tmp_path):
    """save_weights after reset_classifier(5) stores 5 classes, and load_model rebuilds the same outputs; a MetaFormer
    built directly saves and rebuilds too."""
    model = metaformer.create_model("poolformer_s12", depths=[1, 1, 1, 1], dims=[8, 16, 24, 32], img_size=64)
    model.reset_classifier(5)
    torch.nn.init.normal_(model.head.fc.weight)
    metaformer.save_weights(model, tmp_path / "m.safetensors")
    again = metaformer.load_model(tmp_path / "m.safetensors")
    x = torch.randn(2, 3, 64, 64)
    assert again.num_classes == 5
    torch.testing.assert_close(again.eval()(x), model.eval()(x))
    # a MetaFormer built directly, not through create_model, saves and rebuilds too
    direct = metaformer.MetaFormer(depths=[1, 1], dims=[8, 16], num_classes=3, img_size=64)
    metaformer.save_weights(direct, tmp_path / "d.safetensors")
    torch.testing.assert_close(metaformer.load_model(tmp_path / "d.safetensors").eval()(x), direct.eval()(x))


def test_weights_with_nan_or_inf_are_refused_naming_the_tensors(trained, tmp_path, capsys):
    model = load_for_inference(None, str(trained / "run/best.pth")).model
    with torch.no_grad():
        model.stages[1].blocks[0].mlp.fc1.weight[0, 0] = float("nan")
        model.head.fc.bias[3] = float("inf")
    metaformer.save_weights(model, tmp_path / "nan.safetensors", class_names=[str(i) for i in range(10)])
    with pytest.raises(metaformer.WeightsError, match=r"2 tensor\(s\) hold NaN or inf values") as e:
        metaformer.load_model(tmp_path / "nan.safetensors")
    assert "stages.1.blocks.0.mlp.fc1.weight" in str(e.value) and "head.fc.bias" in str(e.value)
    err = one_line_error(capsys, "eval", "--checkpoint", str(tmp_path / "nan.safetensors"))
    assert "hold NaN or inf" in err and "--allow-nonfinite" in err
    assert not metaformer.load_model(tmp_path / "nan.safetensors", allow_nonfinite=True).head.fc.bias.isfinite().all()


# ----------------------------------------------------------------------------- exported files

def test_predict_with_another_models_exported_file_refuses(trained, tmp_path, capsys):
    """predict refuses an ONNX file exported from another model than --checkpoint (its classes named); alone, the
    file runs with its own class names."""
    other = metaformer.create_model("poolformer_s12", depths=[1, 1, 1, 1], dims=[8, 16, 24, 32], img_size=32,
                                    num_classes=3)
    metaformer.save_weights(other, tmp_path / "other.safetensors", class_names=["cat", "dog", "fox"])
    onnx_file = tmp_path / "other.onnx"
    assert main(["export", "--checkpoint", str(tmp_path / "other.safetensors"), "-o", str(onnx_file)]) == 0
    digit = tmp_path / "digit.png"
    D.Digits("val", 32).images[0].save(digit)
    capsys.readouterr()
    err = one_line_error(capsys, "predict", str(digit), "--checkpoint", str(trained / "run/best.pth"),
                         "--exported", str(onnx_file))
    assert "was exported from another model" in err and "3 classes (cat, dog, fox) vs 10" in err
    # alone, the file carries its own class names and preprocessing
    assert main(["predict", str(digit), "--exported", str(onnx_file), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["predictions"][0][0] in ("cat", "dog", "fox")


def test_corrupt_onnx_and_decompression_bomb_are_one_line_errors(trained, tmp_path, capsys, monkeypatch):
    digit = tmp_path / "digit.png"
    D.Digits("val", 32).images[0].save(digit)
    (tmp_path / "bad.onnx").write_bytes(b"not a protobuf")
    err = one_line_error(capsys, "predict", str(digit), "--exported", str(tmp_path / "bad.onnx"))
    assert "bad.onnx: not a readable onnx file" in err
    Image.new("L", (200, 200)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 200x200 > 2 x 100: a bomb by Pillow's rule
    err = one_line_error(capsys, "predict", str(tmp_path / "bomb.png"), "--checkpoint", str(trained / "run/best.pth"))
    assert "possible decompression bomb" in err


# ----------------------------------------------------------------------------- checkpoint arguments

def test_checkpoint_arguments_say_what_they_are(trained, tmp_path, capsys, monkeypatch):
    run = trained / "run"
    err = one_line_error(capsys, "eval", "--checkpoint", str(run))
    assert "is a folder, not a checkpoint file" in err and "best.pth" in err
    err = one_line_error(capsys, "eval", "--checkpoint", str(tmp_path / "missing.pth"))
    assert "does not exist" in err
    (tmp_path / "cut.pth").write_bytes((run / "best.pth").read_bytes()[:5000])
    err = one_line_error(capsys, "eval", "--checkpoint", str(tmp_path / "cut.pth"))
    assert "truncated or corrupt" in err
    torch.save({"task": "detect", "model": {}}, tmp_path / "det.pth")
    err = one_line_error(capsys, "eval", "--checkpoint", str(tmp_path / "det.pth"))
    assert "is a `metaformer detect` checkpoint" in err and "metaformer detect eval" in err
    # a URL is downloaded (once, into the cache) and used, not reported missing
    url = (run / "best.pth").as_uri()
    monkeypatch.setenv("METAFORMER_CACHE", str(tmp_path / "cache"))  # undone after the test, whatever was there
    assert eval_json(capsys, "--checkpoint", url)["images"] == 360


# ----------------------------------------------------------------------------- library arguments

@pytest.mark.parametrize("kwargs, message", [
    (dict(depths=[2, 0, 6, 2]), "depths must be positive integers"),
    (dict(depths=[2, -1, 6, 2]), "depths must be positive integers"),
    (dict(num_classes=-1), "num_classes must be an integer >= 0"),
    (dict(pool_size=0), "pool_size must be a positive odd integer"),
    (dict(pool_size=-3), "pool_size must be a positive odd integer"),
    (dict(dims=[64, 0, 320, 512]), "dims must be positive integers"),
    (dict(mlp_ratios=0), "mlp_ratios must be positive numbers"),
    (dict(in_chans=0), "in_chans must be a positive integer"),
    (dict(drop_path_rate=1.0), r"drop_path_rate must be in \[0, 1\)"),
    (dict(drop_path_rate=-0.1), r"drop_path_rate must be in \[0, 1\)"),
    (dict(img_size=0), "img_size must be a positive integer"),
    (dict(img_size=(224, -1)), "img_size must be a positive integer"),
])
def test_bad_model_arguments_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        metaformer.MetaFormer(**kwargs)


def test_dynamic_size_on_a_size_bound_model_suggests_a_flag_that_exists(tmp_path, capsys):
    model = metaformer.create_model("metaformer_ppff_s12", depths=[1, 1, 1, 1], dims=[8, 16, 24, 32], img_size=64,
                                    num_classes=2)
    metaformer.save_weights(model, tmp_path / "ff.safetensors", class_names=["a", "b"])
    err = one_line_error(capsys, "export", "--checkpoint", str(tmp_path / "ff.safetensors"), "--dynamic-size",
                         "-o", str(tmp_path / "ff.onnx"))
    assert "Drop --dynamic-size" in err and "--img-size" not in err
