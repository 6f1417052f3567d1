"""Files and options that could give a silent wrong result, a traceback or a message pointing the wrong way get
the right result or one line naming the problem: exported files of other weights, integer "weights", damaged
metadata, headless models, EXIF-rotated photos, unknown names for the recipe's parts, and messages that must point
the right way (class names, missing extras, unreadable files, output folders, shard names)."""
import io
import json
import shutil
import sys

import pytest
import torch
from PIL import Image

import metaformer
from digits import write_digits
from metaformer import data as D
from metaformer.cli import main
from metaformer.tasks.inference import load_for_inference

NET = ["--depths", "1", "1", "1", "1", "--dims", "8", "16", "24", "32", "--img-size", "32", "--batch-size", "4",
       "--workers", "0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_digits(tmp_path_factory.mktemp("data"), classes=("0", "1"), per_class=4)


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """Two runs on the same data (other seeds: other weights, the same classes and input size)."""
    root = tmp_path_factory.mktemp("runs")
    for name, seed in (("a", "0"), ("b", "1")):
        assert main(["train", "--data", str(data), *NET, "--epochs", "1", "--seed", seed,
                     "--output", str(root / name)]) == 0
    return root


def error_line(capsys, verb: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith(f"metaformer {verb}:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def image_of(data):
    return str(next((data / "val/0").iterdir()))


# ----------------------------------------------------------------------------- exported files

def test_predict_refuses_an_exported_file_of_other_weights(data, runs, tmp_path, capsys):
    """An exported file with --checkpoint's classes and input size but other weights is refused, saying to drop
    --checkpoint; with its own checkpoint, or alone, it runs."""
    b_onnx = tmp_path / "b.onnx"
    assert main(["export", "--checkpoint", str(runs / "b/best.pth"), "--output", str(b_onnx)]) == 0
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(runs / "a/best.pth"), "--exported", str(b_onnx), image_of(data)]) == 2
    err = error_line(capsys, "predict")
    assert "b.onnx holds other weights than --checkpoint" in err and "drop --checkpoint" in err
    assert main(["predict", "--checkpoint", str(runs / "b/best.pth"), "--exported", str(b_onnx), image_of(data),
                 "--json"]) == 0
    assert main(["predict", "--exported", str(b_onnx), image_of(data), "--json"]) == 0


def test_an_exported_file_without_a_weights_record_is_not_matched_to_a_checkpoint(data, runs, tmp_path, capsys):
    from metaformer.tools.export import export, export_metadata

    loaded = load_for_inference(None, str(runs / "a/best.pth"))
    meta = {k: v for k, v in export_metadata(loaded).items() if k != "weights_sha256"}  # as 0.1 wrote them
    export(loaded.model, tmp_path / "old.onnx", "onnx", metadata=meta)
    assert main(["predict", "--checkpoint", str(runs / "a/best.pth"), "--exported", str(tmp_path / "old.onnx"),
                 image_of(data)]) == 2
    assert "does not record which weights it holds" in error_line(capsys, "predict")


def edit_onnx(src, dst, edit_tensors=None, edit_meta=None):
    """A copy of the ONNX file ``src`` at ``dst`` with its initializers and/or its metadata changed by hand."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(src))
    if edit_tensors:
        for i, t in enumerate(proto.graph.initializer):
            a = edit_tensors(t.name, numpy_helper.to_array(t).copy())
            if a is not None:
                proto.graph.initializer[i].CopyFrom(numpy_helper.from_array(a, t.name))
    if edit_meta:
        for prop in proto.metadata_props:
            if prop.key == "metaformer":
                prop.value = json.dumps(edit_meta(json.loads(prop.value)))
    onnx.save(proto, str(dst))
    return dst


@pytest.mark.parametrize("edit", ["two head rows swapped", "bytes flipped"])
def test_an_exported_file_whose_weights_were_changed_is_refused(data, runs, tmp_path, capsys, edit):
    a_onnx = tmp_path / "a.onnx"
    assert main(["export", "--checkpoint", str(runs / "a/best.pth"), "--output", str(a_onnx)]) == 0
    capsys.readouterr()

    def change(name, a):
        if edit == "two head rows swapped" and a.ndim == 2 and a.shape[0] == 2:  # the classifier [2, C]
            return a[::-1].copy()
        if edit == "bytes flipped" and a.ndim == 4 and a.size > 100:  # one conv weight, a few values
            a.reshape(-1)[:3] = -a.reshape(-1)[:3]
            return a
        return None

    edited = edit_onnx(a_onnx, tmp_path / "edited.onnx", edit_tensors=change)
    for argv in (["predict", "--checkpoint", str(runs / "a/best.pth"), "--exported", str(edited), image_of(data)],
                 ["predict", "--exported", str(edited), image_of(data)],
                 ["eval", "--exported", str(edited), "--data", str(data)]):
        assert main(argv) == 2
        err = error_line(capsys, argv[0])
        assert "the weights inside the file are not those it was written with" in err, err
    assert main(["predict", "--checkpoint", str(runs / "a/best.pth"), "--exported", str(a_onnx), image_of(data)]) == 0


@pytest.mark.parametrize("meta_edit", ["no preprocessing", "another image size", "a wrong mean", "no class names"])
def test_an_exported_file_with_missing_or_wrong_metadata_is_one_line(data, runs, tmp_path, capsys, meta_edit):
    a_onnx = tmp_path / "a.onnx"
    assert main(["export", "--checkpoint", str(runs / "a/best.pth"), "--output", str(a_onnx)]) == 0
    capsys.readouterr()

    def change(meta):
        if meta_edit == "no preprocessing":
            del meta["preprocessing"]
        elif meta_edit == "another image size":
            meta["preprocessing"]["img_size"] = 48
        elif meta_edit == "a wrong mean":
            meta["preprocessing"]["mean"] = [0.5]
        else:
            del meta["class_names"]
        return meta

    edited = edit_onnx(a_onnx, tmp_path / "edited.onnx", edit_meta=change)
    expected = {"no preprocessing": "has no preprocessing", "another image size": "takes 3x32x32 inputs but its "
                "metadata describes 3x48x48 images", "a wrong mean": "has no usable mean",
                "no class names": "has no list of class names"}[meta_edit]
    for argv in (["predict", "--exported", str(edited), image_of(data)],
                 ["eval", "--exported", str(edited), "--data", str(data)]):
        assert main(argv) == 2
        assert expected in error_line(capsys, argv[0])


# ----------------------------------------------------------------------------- weights files

def save_ours_with(path, tensors=None, **metadata):
    from safetensors.torch import save_file

    model = metaformer.create_model("poolformer_s12", depths=[1, 1, 1, 1], dims=[8, 16, 24, 32], num_classes=2,
                                    img_size=32)
    metaformer.save_weights(model, path, class_names=["0", "1"])
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = {**f.metadata(), **metadata}
        sd = {k: f.get_tensor(k) for k in f.keys()}
    save_file({**sd, **(tensors(sd) if tensors else {})}, str(path), metadata=meta)
    return path


@pytest.mark.parametrize("kind", ["int32", "bool"])
def test_integer_or_boolean_weights_are_refused(data, tmp_path, kind, capsys):
    """An integer or boolean tensor where a float weight belongs is named and refused, and nothing is loaded."""
    def broken(sd):
        return {k: (v.to(torch.int32) if kind == "int32" else v > 0) for k, v in sd.items()
                if k == "head.fc.weight"}

    path = save_ours_with(tmp_path / "w.safetensors", broken)
    assert main(["eval", "--checkpoint", str(path), "--data", str(data), "--workers", "0"]) == 2
    err = error_line(capsys, "eval")
    assert f"head.fc.weight (torch.{kind})" in err and "not weights" in err and "nothing was loaded" in err


@pytest.mark.parametrize("key", ["config", "class_names"])
def test_damaged_json_metadata_is_a_one_line_error(data, tmp_path, key, capsys):
    """A weights file whose config or class_names metadata is not valid JSON is one line naming that key."""
    path = save_ours_with(tmp_path / "w.safetensors", **{key: '{"depths": [1, 1'})
    assert main(["eval", "--checkpoint", str(path), "--data", str(data), "--workers", "0"]) == 2
    assert f"its {key!r} metadata is not valid JSON" in error_line(capsys, "eval")


# ----------------------------------------------------------------------------- headless models

def test_cam_and_eval_refuse_a_model_without_a_classifier(data, tmp_path, capsys):
    """cam and eval refuse a model without a classifier (num_classes 0), cam leaving no output folder; fine-tuning
    from it gives it a new classifier."""
    model = metaformer.create_model("poolformer_s12", depths=[1, 1, 1, 1], dims=[8, 16, 24, 32], num_classes=2,
                                    img_size=32)
    model.reset_classifier(0)
    metaformer.save_weights(model, tmp_path / "headless.safetensors")
    ckpt = str(tmp_path / "headless.safetensors")
    assert main(["cam", "--checkpoint", ckpt, image_of(data), "--output", str(tmp_path / "cam")]) == 2
    assert "no classifier (num_classes 0" in error_line(capsys, "cam") and not (tmp_path / "cam").exists()
    assert main(["eval", "--checkpoint", ckpt, "--data", str(data), "--workers", "0"]) == 2
    assert "has no classifier" in error_line(capsys, "eval")
    # fine-tuning from it is what a headless checkpoint is for: a new classifier, no "strict=False" hint
    assert main(["train", "--data", str(data), *NET, "--epochs", "1", "--pretrained", ckpt,
                 "--output", str(tmp_path / "ft")]) == 0
    assert "new classifier" in capsys.readouterr().out


# ----------------------------------------------------------------------------- EXIF orientation

def portrait_jpeg(orientation: int = 6) -> bytes:
    """A 64x32 (wide) JPEG whose EXIF says: turn me 90 degrees (a phone's portrait photo)."""
    img = Image.new("RGB", (64, 32), (200, 10, 10))
    img.paste((10, 10, 200), (0, 0, 8, 32))  # blue strip on the left
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    return buf.getvalue()


def test_exif_orientation_is_applied_wherever_images_are_read(tmp_path):
    """A photo with EXIF orientation 6 is turned upright (32x64) wherever images are read: files, shard and Hugging
    Face bytes, class folders."""
    (tmp_path / "p.jpg").write_bytes(portrait_jpeg())
    assert D.open_rgb(tmp_path / "p.jpg").size == (32, 64)
    upright = D.open_rgb(tmp_path / "p.jpg")
    assert upright.getpixel((16, 2))[2] > 150  # the strip is on top after the turn
    assert D.open_rgb(portrait_jpeg(), "p.jpg").size == (32, 64)  # from bytes: shards, Hugging Face rows, serve
    root = tmp_path / "root"
    for split in ("train", "val"):
        (root / split / "a").mkdir(parents=True)
        (root / split / "a" / "p.jpg").write_bytes(portrait_jpeg())
    assert D.SafeImageFolder(root / "train")[0][0].size == (32, 64)  # train, eval


# ----------------------------------------------------------------------------- names and sizes

@pytest.mark.parametrize("flags,expected", [
    (["--opt", "nosuch"], "--opt 'nosuch': timm has no such optimizer"),
    (["--sched", "nosuch"], "--sched 'nosuch': choose one of cosine"),
    (["--sched", "plateau"], "--sched 'plateau': choose one of"),
    (["--aa", "nosuch"], "--aa 'nosuch' is not a timm augmentation policy"),
    (["--train-interpolation", "nosuch"], "--train-interpolation 'nosuch': choose random, nearest"),
    (["--remode", "nosuch"], "--remode 'nosuch': choose one of pixel, rand, const"),
    (["--opt-betas", "0.9"], "--opt-betas takes 2 values (e.g. 0.9 0.999), got 1"),
    (["--scale", "0.9", "0.1"], "--scale takes two values MIN MAX with MIN <= MAX"),
    (["--batch-size", "1"], "Mixup and CutMix mix the images of a batch in pairs, so --batch-size must be at least 2"),
    (["--model-kwargs", "{norm: bn}", "--batch-size", "1", "--mixup", "0", "--cutmix", "0"],
     "BatchNorm cannot train on a batch of 1 at 32x32"),
])
def test_train_refuses_unknown_parts_and_impossible_batches(data, tmp_path, flags, expected, capsys):
    """Unknown optimizers, schedulers, augmentations, interpolations and erase modes, malformed value pairs, and
    batches Mixup or BatchNorm cannot train on are refused in one line before training; no checkpoint is written."""
    assert main(["train", "--data", str(data), *NET, "--epochs", "1", "--output", str(tmp_path / "r"), *flags]) == 2
    assert expected in error_line(capsys, "train")
    assert not (tmp_path / "r" / "last.pth").exists()


def test_nan_in_a_yaml_config_is_named_with_its_file(data, tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("lr: .nan\n")
    assert main(["train", "--data", str(data), *NET, "--config", str(tmp_path / "c.yaml"),
                 "--output", str(tmp_path / "r")]) == 2
    assert f"{tmp_path / 'c.yaml'}: lr: nan is not a finite number; it must be > 0" in error_line(capsys, "train")


@pytest.mark.parametrize("argv,expected", [
    (["bench", "--modes", "nosuch"], "argument --modes: unknown 'nosuch'; choose from eager"),
    (["bench", "--img-size", "7"], "argument --img-size: must be 32 to 4096, not 7"),
    (["bench", "--device", "cuda"] if not torch.cuda.is_available() else ["bench", "--device", "cuda:99"],
     "--device cuda"),
    (["info", "poolformer_s12", "--img-size", "7"], "argument --img-size: must be 32 to 4096, not 7"),
    (["segment", "train", "--data-root", ".", "--crop-size", "16"], "argument --crop-size: must be 32 to 4096"),
])
def test_bench_info_segment_sizes_and_devices(argv, expected, tmp_path, capsys):
    argv = [*argv, "--output", str(tmp_path / "o")] if argv[0] != "info" else argv
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    assert rc == 2
    assert expected in error_line(capsys, " ".join(argv[:2]) if argv[0] == "segment" else argv[0])


def test_bench_runs_a_size_bound_variant_at_another_size(tmp_path, capsys):
    """bench runs RandFormer (its mixing sized for the token grid) at --img-size 32, counting FLOPs at that size."""
    out = tmp_path / "b.json"
    assert main(["bench", "--variant", "randformer_s12", "--img-size", "32", "--batch-size", "1", "--modes", "eager",
                 "--repeats", "1", "--warmup", "0", "--no-memory", "--output", str(out)]) == 0
    assert json.loads(out.read_text())["results"][0]["variant"] == "randformer_s12"


# ----------------------------------------------------------------------------- messages that pointed the wrong way

def test_the_nan_hint_names_allow_nonfinite_only_where_it_exists(runs, tmp_path, capsys):
    model = load_for_inference(None, str(runs / "a/best.pth")).model
    with torch.no_grad():
        model.head.fc.bias[1] = float("nan")
    nan = tmp_path / "nan.safetensors"
    metaformer.save_weights(model, nan, class_names=["0", "1"])
    assert main(["eval", "--checkpoint", str(nan)]) == 2
    assert "--allow-nonfinite" in error_line(capsys, "eval")
    assert main(["convert", str(nan), str(tmp_path / "c.pth"), "--to", "timm"]) == 2
    err = error_line(capsys, "convert")
    assert "hold NaN or inf" in err and "-nonfinite" not in err and "_nonfinite" not in err
    assert main(["train", "--pretrained", str(nan), *NET, "--epochs", "1", "--output", str(tmp_path / "t")]) == 2
    err = error_line(capsys, "train")
    assert "hold NaN or inf" in err and "-nonfinite" not in err and "_nonfinite" not in err


def test_numbered_class_names_are_not_called_missing(runs, tmp_path, capsys):
    """A checkpoint whose classes are named '0' and '1' is said to name its classes by number, not to store none."""
    other = write_digits(tmp_path / "d", classes=("0", "1"), per_class=1)
    (other / "val/0").rename(other / "val/zero")
    assert main(["eval", "--checkpoint", str(runs / "a/best.pth"), "--data", str(other / "val")]) == 2
    err = error_line(capsys, "eval")
    assert "stores no class names" not in err and "The model's classes are named by number: classes are 0..1" in err


def test_the_hf_column_hint_is_a_path_to_pass(tmp_path):
    datasets = pytest.importorskip("datasets")
    from metaformer.data import hfds

    img = Image.new("RGB", (4, 4))
    feats = datasets.Features({"a": datasets.Image(), "b": datasets.Image(), "label": datasets.ClassLabel(names=["x"])})
    split = datasets.Dataset.from_dict({"a": [img], "b": [img], "label": [0]}, features=feats)
    datasets.DatasetDict(train=split, validation=split).save_to_disk(str(tmp_path / "hf"))
    with pytest.raises(D.DataError, match=r"choose one with --data \S+/hf#image=COLUMN$") as e:
        hfds.open_hf(str(tmp_path / "hf"), None, None)
    assert "(train split)#" not in str(e.value)


def test_convert_names_its_own_argument_for_a_folder(tmp_path, capsys):
    assert main(["convert", str(tmp_path), str(tmp_path / "c.pth"), "--to", "timm"]) == 2
    err = error_line(capsys, "convert")
    assert f"SRC {tmp_path} is a folder" in err and "--checkpoint" not in err


def test_a_missing_matplotlib_stops_training_before_the_first_epoch(data, tmp_path, monkeypatch, capsys):
    """Without matplotlib, train stops before the first epoch with one line naming the extra, and leaves no folder."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["train", "--data", str(data), *NET, "--epochs", "1", "--output", str(tmp_path / "r")]) == 2
    assert "needs matplotlib, which is not installed: pip install 'metaformer[train]'" in error_line(capsys, "train")
    assert not (tmp_path / "r").exists()


def test_detect_train_help_lists_only_what_it_writes(capsys):
    with pytest.raises(SystemExit):
        main(["detect", "train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "best.pth" not in text and "the checkpoint last.pth (saved every epoch)" in text


def test_predict_skips_and_lists_an_unreadable_file_in_a_folder(runs, data, tmp_path, capsys):
    """predict on a folder skips an unreadable file, lists it (JSON and stderr) and predicts the others; a folder
    with no readable image is an error."""
    folder = tmp_path / "imgs"
    shutil.copytree(data / "val/0", folder)
    (folder / "broken.png").write_bytes(b"not a png")
    assert main(["predict", "--checkpoint", str(runs / "a/best.pth"), str(folder), "--json"]) == 0
    captured = capsys.readouterr()
    results = json.loads(captured.out)
    assert len(results) == len(list(folder.iterdir()))
    assert [r["image"] for r in results if "error" in r] == [str(folder / "broken.png")]
    assert all(len(r["predictions"]) == 2 for r in results if "error" not in r)
    assert "skipped 1 unreadable image(s)" in captured.err and "broken.png" in captured.err
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "broken.png").write_bytes(b"not a png")
    assert main(["predict", "--checkpoint", str(runs / "a/best.pth"), str(tmp_path / "only")]) == 2
    assert "none of the 1 image(s) could be read" in error_line(capsys, "predict")


def test_detect_and_segment_predict_skip_and_list_an_unreadable_file(tmp_path, capsys):
    from metaformer.tasks.dense.data import make_toy_data

    toy = make_toy_data(tmp_path / "toy", num_train=2, num_val=1, size=64)
    net = ["--override", "depths=[1,1,1,1]", "--override", "dims=[8,16,24,32]", "--fpn-channels", "8",
           "--batch-size", "2", "--workers", "0"]
    assert main(["detect", "train", "--train-images", str(toy / "images/training"), "--train-ann",
                 str(toy / "instances_training.json"), *net, "--min-size", "32", "--max-size", "64", "--epochs", "1",
                 "--output", str(tmp_path / "det")]) == 0
    assert main(["segment", "train", "--data-root", str(toy), "--num-classes", "4", *net, "--img-scale", "64", "64",
                 "--crop-size", "32", "--iters", "1", "--no-val", "--output", str(tmp_path / "seg")]) == 0
    folder = shutil.copytree(toy / "images/validation", tmp_path / "imgs")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    capsys.readouterr()
    for task in ("detect", "segment"):
        assert main([task, "predict", str(folder), "--checkpoint", str(tmp_path / task[:3] / "last.pth"),
                     "--output", str(tmp_path / f"out-{task}"), "--json"]) == 0
        captured = capsys.readouterr()
        results = json.loads(captured.out)
        assert [r["image"] for r in results if "error" in r] == [str(folder / "broken.jpg")]
        assert (tmp_path / f"out-{task}" / "validation_0000.png").is_file()
        assert "skipped 1 unreadable image(s)" in captured.err and "broken.jpg" in captured.err


def test_pack_refuses_an_output_inside_the_data_it_packs(data, tmp_path, capsys):
    """`data pack ROOT ROOT/train/zz` (an output inside the data it packs) is refused and adds no class folder."""
    root = shutil.copytree(data, tmp_path / "root")
    assert main(["data", "pack", str(root), str(root / "train/zz")]) == 2
    assert "is inside" in error_line(capsys, "data")
    assert sorted(p.name for p in (root / "train").iterdir()) == ["0", "1"]


@pytest.mark.parametrize("name", ["../outside.tar", "/tmp/outside.tar"])
def test_shard_names_in_info_json_stay_inside_the_shard_folder(data, tmp_path, name, capsys):
    """A shard named in _info.json with ../ or an absolute path is refused: shards are read from the shard folder
    only."""
    pytest.importorskip("webdataset")
    shards = tmp_path / "shards"
    assert main(["data", "pack", str(data), str(shards)]) == 0
    info = json.loads((shards / "_info.json").read_text())
    shutil.copy(shards / info["splits"]["train"]["filenames"][0], tmp_path / "outside.tar")
    info["splits"]["train"]["filenames"][0] = name
    (shards / "_info.json").write_text(json.dumps(info))
    assert main(["data", "check", str(shards)]) == 2
    err = error_line(capsys, "data")
    assert f"names shard {name!r}, which is not inside {shards}" in err


# ----------------------------------------------------------------------------- weights that record their model

def test_create_model_with_a_file_of_another_architecture_names_load_model(runs, tmp_path):
    """``create_model(name, pretrained=FILE)`` of a file recording another network: one error naming the
    differences and the call that rebuilds it (a training checkpoint or a save_weights file alike)."""
    small = tmp_path / "small.safetensors"
    metaformer.save_weights(metaformer.create_model("poolformer_s12", depths=[1, 1, 1, 1], dims=[8, 16, 24, 32],
                                                    num_classes=2, img_size=32), small, class_names=["0", "1"])
    for path in (small, runs / "a/best.pth"):
        with pytest.raises(metaformer.WeightsError, match=r"depths \[1, 1, 1, 1\] \(not \[2, 2, 6, 2\]\), dims \[8, "
                           r"16, 24, 32\] \(not \[64, 128, 320, 512\]\).*metaformer.load_model\("):
            metaformer.create_model("poolformer_s12", pretrained=str(path))
        model = metaformer.load_model(path)  # as the message says
        assert model.config["depths"] == [1, 1, 1, 1] and model.class_names == ["0", "1"]
    same = metaformer.create_model("poolformer_s12", pretrained=str(small), depths=[1, 1, 1, 1],
                                   dims=[8, 16, 24, 32], num_classes=2, img_size=32)
    torch.testing.assert_close(same.state_dict(), metaformer.load_model(small).state_dict())
    # options the weights do not depend on (as for load_weights) are the caller's to change
    pooled = metaformer.create_model("poolformer_s12", pretrained=str(small), depths=[1, 1, 1, 1],
                                     dims=[8, 16, 24, 32], num_classes=2, global_pool="", drop_path_rate=0.1)
    torch.testing.assert_close(pooled.state_dict(), same.state_dict())


def test_features_only_from_classifier_weights_says_its_maps_are_normed(tmp_path):
    small = tmp_path / "small.safetensors"
    kw = dict(depths=[1, 1, 1, 1], dims=[8, 16, 24, 32], num_classes=2, img_size=32)
    metaformer.save_weights(metaformer.create_model("poolformer_s12", **kw), small)
    with pytest.warns(UserWarning, match="new norm .* not the network's raw stage outputs .*feature_cls='list'"):
        metaformer.create_model("poolformer_s12", pretrained=str(small), features_only=True, **kw)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # timm's raw maps, and a backbone built without weights: nothing to say
        metaformer.create_model("poolformer_s12", pretrained=str(small), features_only=True, feature_cls="list", **kw)
        metaformer.create_model("poolformer_s12", features_only=True, **kw)
