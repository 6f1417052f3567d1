"""Ordinary and hostile inputs to `metaformer detect` / `segment`: bad images and labels, Ctrl-C, evaluations
that die, re-runs into the same folder, NaN boxes, bad polygons, the ignore label. Nothing may be lost."""
import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from metaformer.cli import main
from metaformer.tasks import detection, segmentation
from metaformer.tasks.dense import run as dense_run
from metaformer.tasks.dense.data import AnnotationError, SegmentationDataset, load_coco, make_toy_data
from metaformer.engine.checkpoint import load as load_checkpoint
from metaformer.tasks.detection import DetectionConfig, train_detection
from metaformer.tasks.segmentation import SegmentationConfig, train_segmentation
from metaformer.engine.stop import Interrupted, TrainingDiverged

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools.*")

TINY = dict(depths=[1, 1, 1, 1], dims=[16, 32, 48, 64])


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy_data(tmp_path_factory.mktemp("toy"), num_train=4, num_val=2, size=64, seed=1)


def det_cfg(toy, out, epochs=2, resume=None, val=True, **kw):
    return DetectionConfig(train_images=str(toy / "images/training"), train_ann=str(toy / "instances_training.json"),
                           val_images=str(toy / "images/validation") if val else None,
                           val_ann=str(toy / "instances_validation.json") if val else None, output=str(out),
                           arch="retinanet", backbone_overrides=TINY, fpn_channels=32, min_size=64, max_size=64,
                           epochs=epochs, lr_steps=[1], lr=1e-3, warmup_iters=3, batch_size=2, workers=0,
                           resume=resume, log_every=1000, **kw)


def seg_cfg(root, out, resume=None, **kw):
    return SegmentationConfig(data_root=str(root), output=str(out), num_classes=4, backbone_overrides=TINY,
                              fpn_channels=16, head_channels=16, img_scale=[64, 64], crop_size=64, iters=4,
                              batch_size=2, workers=0, resume=resume, log_every=2, **{"eval_every": 2,
                                                                                       "ckpt_every": 2, **kw})


def same_weights(a, b):
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=1e-6, msg=k)


def corrupt(path):
    path.write_bytes(b"\xff\xd8 not really a jpeg")


# ----------------------------------------------------------------------------- evaluate after saving

def test_detection_saves_before_evaluating_and_a_dead_evaluation_is_redone(toy, tmp_path, monkeypatch):
    """The epoch's checkpoint is written before its evaluation: an evaluation that dies keeps the epoch, marked
    pending, and the resumed run evaluates it."""
    real = detection.evaluate_detection

    def dies(*a, **k):
        raise RuntimeError("evaluation died")

    monkeypatch.setattr(detection, "evaluate_detection", dies)
    with pytest.raises(RuntimeError, match="evaluation died"):
        train_detection(det_cfg(toy, tmp_path / "b", epochs=1))
    ckpt = load_checkpoint(tmp_path / "b/last.pth", "detect")
    assert ckpt["epoch"] == 1 and ckpt["pending_eval"] and "bbox_mAP" not in ckpt["history"][-1]
    monkeypatch.setattr(detection, "evaluate_detection", real)
    history = train_detection(det_cfg(toy, tmp_path / "b", epochs=1, resume="auto"))
    assert [h["epoch"] for h in history] == [1] and "bbox_mAP" in history[0]  # the evaluation, redone
    rows = [json.loads(line) for line in open(tmp_path / "b/metrics.jsonl")]
    assert rows == json.loads(json.dumps(history))


def test_a_bad_validation_image_is_skipped_and_listed(toy, tmp_path, capsys):
    data = tmp_path / "toy"
    shutil.copytree(toy, data)
    corrupt(data / "images/validation/validation_0001.jpg")
    history = train_detection(det_cfg(data, tmp_path / "run", epochs=1))
    out = capsys.readouterr().out
    assert "skipped 1 unreadable image(s) in the validation set" in out and "validation_0001.jpg" in out
    assert history[-1]["val_unreadable"] == 1 and "bbox_mAP" in history[-1]
    assert (tmp_path / "run/last.pth").exists()


def test_segmentation_saves_before_evaluating_and_skips_bad_labels(toy, tmp_path, capsys, monkeypatch):
    data = tmp_path / "toy"
    shutil.copytree(toy, data)
    Image.open(data / "annotations/validation/validation_0000.png").convert("RGB").save(
        data / "annotations/validation/validation_0000.png")  # an RGB label: unusable
    real = segmentation.evaluate_segmentation
    monkeypatch.setattr(segmentation, "evaluate_segmentation", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("died")))
    with pytest.raises(RuntimeError, match="died"):
        train_segmentation(seg_cfg(data, tmp_path / "s"))
    ckpt = load_checkpoint(tmp_path / "s/last.pth", "segment")
    assert ckpt["iteration"] == 2 and ckpt["pending_eval"]
    monkeypatch.setattr(segmentation, "evaluate_segmentation", real)
    history = train_segmentation(seg_cfg(data, tmp_path / "s", resume="auto"))
    assert [h["iteration"] for h in history] == [2, 4] and all("mIoU" in h for h in history)
    assert history[0]["val_unreadable"] == 1
    assert "validation_0000.jpg" in capsys.readouterr().out


# ----------------------------------------------------------------------------- Ctrl-C, bad training images

def interrupt_after(monkeypatch, calls):
    count = {"n": 0}

    def stop(rt, s):
        count["n"] += 1
        return count["n"] == calls

    monkeypatch.setattr(dense_run, "stop_requested", stop)


def test_ctrl_c_in_detection_saves_mid_epoch_and_resumes_exactly(toy, tmp_path, monkeypatch):
    """Ctrl-C in a detection run saves mid-epoch, and the resumed run ends with the weights and losses of an
    uninterrupted one."""
    train_detection(det_cfg(toy, tmp_path / "a", val=False))
    interrupt_after(monkeypatch, 3)  # after the 3rd of 4 steps (2 epochs x 2 batches)
    with pytest.raises(Interrupted, match="saved .*last.pth. Continue with the same command plus --resume auto"):
        train_detection(det_cfg(toy, tmp_path / "b", val=False))
    ckpt = load_checkpoint(tmp_path / "b/last.pth", "detect")
    assert (ckpt["epoch"], ckpt["step_in_epoch"], ckpt["iteration"]) == (1, 1, 3)
    monkeypatch.undo()
    train_detection(det_cfg(toy, tmp_path / "b", val=False, resume="auto"))
    a, b = load_checkpoint(tmp_path / "a/last.pth", "detect"), load_checkpoint(tmp_path / "b/last.pth", "detect")
    assert a["iteration"] == b["iteration"] == 4
    same_weights(a, b)
    assert [h["loss"] for h in a["history"]] == pytest.approx([h["loss"] for h in b["history"]], abs=1e-6)


def test_ctrl_c_on_the_command_line_exits_130_saying_how_to_continue(toy, tmp_path, monkeypatch, capsys):
    interrupt_after(monkeypatch, 1)
    rc = main(["segment", "train", "--data-root", str(toy), "--num-classes", "4", "--output", str(tmp_path / "s"),
               "--override", "depths=[1,1,1,1]", "--override", "dims=[16,32,48,64]", "--fpn-channels", "16",
               "--img-scale", "64", "64", "--crop-size", "64", "--iters", "4", "--workers", "0", "--no-val"])
    assert rc == 130
    assert "--resume auto" in capsys.readouterr().err
    assert load_checkpoint(tmp_path / "s/last.pth", "segment")["iteration"] == 1


def test_a_corrupt_training_image_is_skipped_and_listed(toy, tmp_path, capsys):
    data = tmp_path / "toy"
    shutil.copytree(toy, data)
    corrupt(data / "images/training/training_0002.jpg")
    history = train_detection(det_cfg(data, tmp_path / "run", epochs=1, val=False))
    out = capsys.readouterr().out
    assert "skipped 1 unreadable image(s) in epoch 1" in out and "training_0002.jpg" in out
    assert history[0]["unreadable"] == 1 and np.isfinite(history[0]["loss"])


# ----------------------------------------------------------------------------- re-runs into one folder

def test_a_second_run_into_the_same_folder_is_refused_and_resume_never_duplicates_rows(toy, tmp_path):
    """A second run into a folder that holds one is refused; --resume auto continues it with one metrics row per
    epoch, and --overwrite starts it over."""
    train_detection(det_cfg(toy, tmp_path / "run", epochs=1, val=False))
    with pytest.raises(ValueError, match="already holds a run .* --resume auto, replace it with --overwrite"):
        train_detection(det_cfg(toy, tmp_path / "run", epochs=2, val=False))
    train_detection(det_cfg(toy, tmp_path / "run", epochs=2, val=False, resume="auto"))
    rows = [json.loads(line) for line in open(tmp_path / "run/metrics.jsonl")]
    assert [r["epoch"] for r in rows] == [1, 2]
    train_detection(det_cfg(toy, tmp_path / "run", epochs=1, val=False, overwrite=True))
    assert [json.loads(line)["epoch"] for line in open(tmp_path / "run/metrics.jsonl")] == [1]


# ----------------------------------------------------------------------------- annotations

def _coco(toy, tmp_path, edit):
    ann = json.loads((toy / "instances_training.json").read_text())
    edit(ann)
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(ann))
    return path


def test_nan_boxes_and_bad_polygons_are_named_at_load(toy, tmp_path, capsys):
    """A NaN box, a bad polygon or a bad RLE mask is named (annotation, image) when the annotations are loaded, in
    one line, before any training."""
    def nan_box(ann):
        ann["annotations"][0]["bbox"][2] = float("nan")

    with pytest.raises(AnnotationError, match=r"annotation 1 has bbox \[.*nan.*\]; expected \[x, y, width, height\] "
                                              "of finite numbers"):
        load_coco(_coco(toy, tmp_path, nan_box), toy / "images/training")

    def bad_polygon(ann):
        ann["annotations"][1]["segmentation"] = [[10, 10, 20]]

    path = _coco(toy, tmp_path, bad_polygon)
    rc = main(["detect", "train", "--train-images", str(toy / "images/training"), "--train-ann", str(path),
               "--output", str(tmp_path / "r"), "--arch", "mask_rcnn", "--workers", "0"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert re.search(r"annotation 2 \(image 'training_000\d.jpg'\) has a bad polygon \[10, 10, 20\]", err), err

    def bad_rle(ann):
        ann["annotations"][1]["segmentation"] = {"counts": "abc", "size": [5, 5]}

    with pytest.raises(AnnotationError, match=r"RLE mask of size \[5, 5\], but the image is 64x64"):
        load_coco(_coco(toy, tmp_path, bad_rle), toy / "images/training")


def test_label_255_is_ignore_with_the_ade20k_label_shift(toy, tmp_path):
    root = tmp_path / "ade"
    shutil.copytree(toy, root)
    png = root / "annotations/training/training_0000.png"
    seg = np.asarray(Image.open(png)).copy()
    seg[:5, :5] = 255
    Image.fromarray(seg).save(png)
    ds = SegmentationDataset(root, "training", num_classes=4)
    label = ds.read_label(0)
    assert (label[:5, :5] == 255).all()  # ignored, not class 254 (an error before)
    assert set(np.unique(label)) <= {0, 1, 2, 3, 255}


# ----------------------------------------------------------------------------- NaN losses

def nan_from_call(monkeypatch, module, builder, call):
    """Models whose forward returns NaN losses from its ``call``-th training call on."""
    real = getattr(module, builder)
    count = {"n": 0}

    def build(*a, **k):
        model = real(*a, **k)
        forward = model.forward

        def poisoned(*args, **kwargs):
            out = forward(*args, **kwargs)
            if model.training:
                count["n"] += 1
                if count["n"] >= call:
                    nan = torch.tensor(float("nan"))
                    out = {k: v * nan for k, v in out.items()} if isinstance(out, dict) else out * nan
            return out

        model.forward = poisoned
        return model

    monkeypatch.setattr(module, builder, build)


def test_a_nan_loss_stops_detection_before_the_step_naming_the_last_checkpoint(toy, tmp_path, monkeypatch, capsys):
    nan_from_call(monkeypatch, detection, "build_detector", 3)  # the first step of epoch 2
    with pytest.raises(TrainingDiverged, match=r"loss is nan at epoch 2, iteration 3; stopped without applying it. "
                                               r"Last good checkpoint: .*last.pth \(resume with --resume"):
        train_detection(det_cfg(toy, tmp_path / "run", val=False))
    ckpt = load_checkpoint(tmp_path / "run/last.pth", "detect")
    assert ckpt["iteration"] == 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_a_nan_loss_stops_segmentation_with_one_line_on_the_command_line(toy, tmp_path, monkeypatch, capsys):
    nan_from_call(monkeypatch, segmentation, "build_segmenter", 3)
    rc = main(["segment", "train", "--data-root", str(toy), "--num-classes", "4", "--output", str(tmp_path / "s"),
               "--override", "depths=[1,1,1,1]", "--override", "dims=[16,32,48,64]", "--fpn-channels", "16",
               "--img-scale", "64", "64", "--crop-size", "64", "--iters", "4", "--workers", "0", "--no-val",
               "--batch-size", "2", "--ckpt-every", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("metaformer segment: error: loss is nan at iteration 3"), err
    ckpt = load_checkpoint(tmp_path / "s/last.pth", "segment")
    assert ckpt["iteration"] == 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
