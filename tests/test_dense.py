"""Dense prediction: backbone, torchvision detectors, Semantic FPN, data checks, CLI end to end.

Everything runs on the generated shapes data with tiny backbones and heads, on CPU.
"""
from __future__ import annotations

import contextlib
import io
import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from metaformer.cli import main
from metaformer.tasks.dense import MetaFormerBackbone, mask_rcnn, retinanet, semantic_fpn
from metaformer.tasks.dense.data import CocoDetection, SegmentationDataset, make_toy_data
from metaformer.engine.checkpoint import load as load_checkpoint
from metaformer.tasks.detection import DetectionConfig, train_detection
from metaformer.tasks.segmentation import SegmentationConfig, train_segmentation
from metaformer import create_model

# pycocotools' mask decoding trips a numpy 2 deprecation notice; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools.*")

TINY = dict(depths=[1, 1, 1, 1], dims=[16, 32, 48, 64])
TINY_CLI = ["--override", "depths=[1,1,1,1]", "--override", "dims=[16,32,48,64]"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy_data(tmp_path_factory.mktemp("toy"), num_train=8, num_val=4, size=128, seed=0)


def _rows(path):
    return [json.loads(line) for line in open(path)]


# ----------------------------------------------------------------------------- backbone

def test_backbone_outputs_one_normed_map_per_stage():
    bb = MetaFormerBackbone("poolformer_s12", **TINY)
    feats = bb(torch.randn(2, 3, 96, 128))
    assert [tuple(f.shape) for f in feats] == [(2, 16, 24, 32), (2, 32, 12, 16), (2, 48, 6, 8), (2, 64, 3, 4)]
    assert bb.strides == [4, 8, 16, 32] and bb.out_channels == TINY["dims"]
    # Each output went through its own GroupNorm(1): per sample, zero mean / unit variance at init.
    for f in feats:
        assert torch.allclose(f.mean((1, 2, 3)), torch.zeros(2), atol=1e-4)
        assert torch.allclose(f.var((1, 2, 3), unbiased=False), torch.ones(2), atol=1e-2)
    assert len(MetaFormerBackbone("poolformer_s12", out_indices=(1, 3), **TINY)(torch.randn(1, 3, 64, 64))) == 2


def test_frozen_stages_freeze_params_and_keep_norms_in_eval():
    bb = MetaFormerBackbone("poolformer_s12", frozen_stages=2, norm="bn", **TINY)
    frozen = [bb.body.stem, bb.body.stages[0], bb.body.stages[1]]
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    assert all(p.requires_grad for m in (bb.body.stages[2], bb.body.stages[3], bb.body.feature_norms)
               for p in m.parameters())
    bb.train()
    assert not any(m.training for f in frozen for m in f.modules())
    assert bb.body.stages[2].training
    bn = bb.body.stages[1].blocks[0].norm1
    before = bn.running_mean.clone()
    bb(torch.randn(2, 3, 64, 64) * 5 + 3)
    assert torch.equal(bn.running_mean, before)  # frozen BN statistics do not move
    assert not torch.equal(bb.body.stages[2].blocks[0].norm1.running_mean, torch.zeros(48))
    with pytest.raises(ValueError, match="frozen_stages"):
        MetaFormerBackbone("poolformer_s12", frozen_stages=5, **TINY)


def test_backbone_loads_an_imagenet_checkpoint_dropping_the_classifier(tmp_path, capsys):
    clf = create_model("poolformer_s12", **TINY)
    torch.save(clf.state_dict(), tmp_path / "imagenet.pth")
    bb = MetaFormerBackbone("poolformer_s12", pretrained=str(tmp_path / "imagenet.pth"), **TINY)
    assert {"head.fc.weight", "head.fc.bias"} <= set(bb.load_report.dropped)
    assert "dropped the classifier" in capsys.readouterr().out
    assert torch.equal(bb.body.stages[3].blocks[0].mlp.fc1.weight, clf.stages[3].blocks[0].mlp.fc1.weight)
    assert torch.equal(bb.body.stem.conv.weight, clf.stem.conv.weight)


def test_fpn_levels_match_the_paper():
    x = [torch.rand(3, 128, 128)]
    ret = retinanet("poolformer_s12", 4, backbone_overrides=TINY, fpn_channels=64, min_size=128, max_size=128)
    feats = ret.backbone(torch.rand(1, 3, 128, 128))
    # Stages 2-4 (strides 8/16/32) + P6/P7; P6 reads the last backbone map even when it has the FPN's width.
    assert [(k, v.shape[1], 128 // v.shape[-1]) for k, v in feats.items()] == [
        ("0", 64, 8), ("1", 64, 16), ("2", 64, 32), ("p6", 64, 64), ("p7", 64, 128)]
    assert ret.backbone.fpn.extra_blocks.use_P5 is False
    assert ret.backbone.body.out_indices == (1, 2, 3)
    mrc = mask_rcnn("poolformer_s12", 4, backbone_overrides=TINY, fpn_channels=64, min_size=128, max_size=128,
                    box_head_dim=64, mask_head_channels=16)
    feats = mrc.backbone(torch.rand(1, 3, 128, 128))
    assert [(k, 128 // v.shape[-1]) for k, v in feats.items()] == [("0", 4), ("1", 8), ("2", 16), ("3", 32),
                                                                    ("pool", 64)]
    for model in (ret, mrc):
        model.eval()
        with torch.no_grad():
            out = model(x)[0]
        assert set(out) >= {"boxes", "scores", "labels"}
    assert "masks" in out
    seg = semantic_fpn("poolformer_s12", 5, backbone_overrides=TINY, fpn_channels=32, head_channels=16)
    assert seg(torch.randn(1, 3, 100, 76)).shape == (1, 5, 100, 76)


# ----------------------------------------------------------------------------- detection

def test_detect_train_eval_resume_predict_cli(toy, tmp_path):
    run = tmp_path / "run"
    common = ["detect", "train", "--train-images", str(toy / "images/training"),
              "--train-ann", str(toy / "instances_training.json"), "--arch", "mask_rcnn", "--output", str(run),
              *TINY_CLI, "--fpn-channels", "64", "--min-size", "128", "--max-size", "128", "--lr", "1e-3",
              "--lr-steps", "6", "--warmup-iters", "4", "--workers", "0", "--batch-size", "2",
              "--detector-opt", "box_head_dim=128", "--detector-opt", "mask_head_channels=32",
              "--detector-opt", "box_batch_size_per_image=64", "--detector-opt", "rpn_post_nms_top_n_train=300"]
    assert main(common + ["--epochs", "5"]) == 0
    assert main(common + ["--epochs", "6", "--resume", "auto"]) == 0  # one more epoch from last.pth
    rows = _rows(run / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[-1]["iteration"] == 24
    assert rows[-1]["loss"] < 0.6 * rows[0]["loss"], [r["loss"] for r in rows]
    ckpt = load_checkpoint(run / "last.pth", "detect")
    assert ckpt["epoch"] == 6 and ckpt["step_in_epoch"] == 0 and len(ckpt["history"]) == 6

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):  # on the 4 validation images, which training never saw
        assert main(["detect", "eval", "--checkpoint", str(run / "last.pth"), "--images",
                     str(toy / "images/validation"), "--ann", str(toy / "instances_validation.json"), "--json",
                     "--workers", "0"]) == 0
    metrics = json.loads(buf.getvalue())  # measured: bbox AP 0.38, AP50 0.65; mask AP50 0.68
    assert metrics["bbox_mAP_50"] > 0.3 and metrics["bbox_mAP"] > 0.1, metrics
    assert metrics["segm_mAP_50"] > 0.3, metrics

    pred = tmp_path / "pred"
    assert main(["detect", "predict", str(toy / "images/validation"), "--checkpoint", str(run / "last.pth"),
                 "--output", str(pred), "--score-thresh", "0.3"]) == 0
    pngs = sorted(pred.glob("*.png"))
    assert len(pngs) == 4
    src = np.asarray(Image.open(toy / "images/validation" / (pngs[0].stem + ".jpg")).convert("RGB"), dtype=float)
    assert np.abs(np.asarray(Image.open(pngs[0]).convert("RGB"), dtype=float) - src).mean() > 0.5  # boxes drawn


def test_detection_resume_is_exact(toy, tmp_path):
    data = tmp_path / "four"
    make_toy_data(data, num_train=4, num_val=1, size=64, seed=1)

    def cfg(out, epochs, resume=None):
        return DetectionConfig(train_images=str(data / "images/training"),
                               train_ann=str(data / "instances_training.json"), output=str(out), arch="retinanet",
                               backbone_overrides=TINY, fpn_channels=32, min_size=64, max_size=64, epochs=epochs,
                               lr_steps=[1], lr=1e-3, warmup_iters=3, batch_size=2, workers=0, resume=resume,
                               log_every=1000)

    train_detection(cfg(tmp_path / "a", 2))
    train_detection(cfg(tmp_path / "b", 1))
    train_detection(cfg(tmp_path / "b", 2, resume="auto"))
    a = load_checkpoint(tmp_path / "a/last.pth", "detect")
    b = load_checkpoint(tmp_path / "b/last.pth", "detect")
    assert a["iteration"] == b["iteration"] == 4
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=1e-6, msg=k)


# ----------------------------------------------------------------------------- bad data

def _break(toy, tmp_path, how):
    ann = json.loads((toy / "instances_training.json").read_text())
    path = tmp_path / "bad.json"
    if how == "malformed":
        path.write_text(json.dumps(ann)[:-20])
        return path, "not valid JSON"
    if how == "box_outside":
        ann["annotations"][3]["bbox"] = [100, 100, 60, 20]
        expect = re.escape(f"annotation {ann['annotations'][3]['id']} has bbox [100, 100, 60, 20]") + ".*outside"
    elif how == "unknown_category":
        ann["annotations"][1]["category_id"] = 42
        expect = re.escape(f"annotation {ann['annotations'][1]['id']} has category_id 42, which is not in 'categories'")
    elif how == "missing_image":
        ann["images"][2]["file_name"] = "nope.jpg"
        expect = "1 of 8 image files listed in .* are missing .* 'nope.jpg'"
    path.write_text(json.dumps(ann))
    return path, expect


@pytest.mark.parametrize("how", ["malformed", "box_outside", "unknown_category", "missing_image"])
def test_bad_annotation_file_gives_one_clear_line(toy, tmp_path, capsys, how):
    path, expect = _break(toy, tmp_path, how)
    rc = main(["detect", "train", "--train-images", str(toy / "images/training"), "--train-ann", str(path),
               "--output", str(tmp_path / "run"), *TINY_CLI, "--workers", "0"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert re.search(expect, err), err
    assert not (tmp_path / "run" / "last.pth").exists()


def test_bad_segmentation_labels_are_named(toy, tmp_path):
    root = tmp_path / "ade"
    shutil.copytree(toy, root)
    ds = SegmentationDataset(root, "training", num_classes=3)  # the toy data has 4 classes after the shift
    with pytest.raises(ValueError, match="class index 3 after the shift by -1.*3 classes"):
        for i in range(len(ds)):
            ds.read_label(i)
    (root / "annotations/training/training_0001.png").unlink()
    with pytest.raises(ValueError, match="1 of 8 images .* have no annotation PNG .*training_0001.png"):
        SegmentationDataset(root, "training")


def test_error_inside_a_loader_worker_is_still_one_line(toy, tmp_path, capsys):
    root = tmp_path / "ade"
    shutil.copytree(toy, root)
    for png in (root / "annotations/training").glob("*.png"):
        Image.open(png).convert("RGB").save(png)
    rc = main(["segment", "train", "--data-root", str(root), "--num-classes", "4", "--output", str(tmp_path / "r"),
               *TINY_CLI, "--img-scale", "128", "64", "--crop-size", "64", "--iters", "2", "--workers", "1",
               "--no-val"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert re.search(r"training_000\d\.png is a RGB image; annotations must be single-channel index PNGs", err), err


def test_coco_targets_match_the_generated_shapes(toy):
    ds = CocoDetection(toy / "images/training", toy / "instances_training.json", masks=True)
    img, t = ds[0]
    assert img.shape == (3, 128, 128) and 0 <= img.min() and img.max() <= 1
    assert t["labels"].min() >= 1 and t["labels"].max() <= 3
    for box, mask in zip(t["boxes"], t["masks"]):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert abs(xs.min() - box[0]) <= 1 and abs(xs.max() + 1 - box[2]) <= 1
        assert abs(ys.min() - box[1]) <= 1 and abs(ys.max() + 1 - box[3]) <= 1


# ----------------------------------------------------------------------------- segmentation

class AllBackground(torch.nn.Module):
    """The trivial segmenter: class 0 (the background, after the shift) everywhere."""
    num_classes = 4

    def forward(self, x):
        logits = torch.zeros(len(x), 4, *x.shape[-2:])
        logits[:, 0] = 1
        return logits


def test_segment_train_eval_predict_cli(toy, tmp_path, capsys):
    """Trained on the 8 training images, scored on the 4 validation images it never saw, against what predicting
    the background everywhere scores there (mIoU 0.22, mAcc 0.25, aAcc 0.90 on this data; the trained model:
    0.62, 0.77, 0.95)."""
    from metaformer.tasks.segmentation import evaluate_segmentation

    trivial = evaluate_segmentation(AllBackground(), SegmentationDataset(toy, "validation", num_classes=4))
    run = tmp_path / "seg"
    assert main(["segment", "train", "--data-root", str(toy), "--val-split", "validation", "--num-classes", "4",
                 "--output", str(run), *TINY_CLI, "--fpn-channels", "32", "--img-scale", "256", "128",
                 "--crop-size", "128", "--iters", "40", "--lr", "1e-3", "--batch-size", "4", "--workers", "0",
                 "--log-every", "10", "--eval-every", "40", "--ckpt-every", "20"]) == 0
    rows = _rows(run / "metrics.jsonl")
    assert rows[-1]["loss"] < 0.6 * rows[0]["loss"], [r["loss"] for r in rows]
    trained = capsys.readouterr().out  # the scores as percentages, like segment eval's
    assert f"done: iteration 40  loss {rows[-1]['loss']:.4g}  mIoU {100 * rows[-1]['mIoU']:.2f}%" in trained, trained

    def beats_trivial(res):
        return (res["mIoU"] > trivial["mIoU"] + 0.2 and res["mAcc"] > trivial["mAcc"] + 0.25
                and res["aAcc"] > trivial["aAcc"] + 0.02)

    assert beats_trivial(rows[-1]), (rows[-1], trivial)
    capsys.readouterr()
    for mode in ("whole", "slide"):
        assert main(["segment", "eval", "--checkpoint", str(run / "last.pth"), "--data-root", str(toy),
                     "--split", "validation", "--mode", mode, "--crop-size", "96", "--json"]) == 0
        res = json.loads(capsys.readouterr().out)
        assert beats_trivial(res), (mode, res, trivial)
        assert len(res["IoU_per_class"]) == 4 and res["images"] == 4
    assert main(["segment", "eval", "--checkpoint", str(run / "last.pth"), "--data-root", str(toy), "--split",
                 "validation"]) == 0
    text = capsys.readouterr().out
    assert f"mIoU {100 * rows[-1]['mIoU']:.2f}%  mAcc {100 * rows[-1]['mAcc']:.2f}%  aAcc " in text, text
    assert re.search(r"mIoU \d+\.\d\d%  mAcc \d+\.\d\d%  aAcc \d+\.\d\d%  \(4 images", text)
    assert main(["segment", "predict", str(toy / "images/validation/validation_0000.jpg"), "--checkpoint",
                 str(run / "last.pth"), "--output", str(tmp_path / "pred")]) == 0
    out = np.asarray(Image.open(tmp_path / "pred/validation_0000.png"))
    assert out.shape == (128, 128, 3)


def test_segmentation_resume_is_exact(toy, tmp_path, monkeypatch):
    from metaformer.engine import checkpoint

    def cfg(out, resume=None):
        return SegmentationConfig(data_root=str(toy), val_split=None, output=str(out), num_classes=4,
                                  backbone_overrides=TINY, fpn_channels=16, head_channels=16, img_scale=[128, 64],
                                  crop_size=64, iters=5, batch_size=3, workers=0, ckpt_every=3, resume=resume,
                                  log_every=1000)

    train_segmentation(cfg(tmp_path / "a"))
    real_save = checkpoint.save

    def save_then_crash(obj, path):
        real_save(obj, path)
        raise KeyboardInterrupt  # killed right after the checkpoint at iteration 3, mid-pass (2 batches a pass)

    monkeypatch.setattr(checkpoint, "save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train_segmentation(cfg(tmp_path / "b"))
    monkeypatch.setattr(checkpoint, "save", real_save)
    assert load_checkpoint(tmp_path / "b/last.pth", "segment")["iteration"] == 3
    train_segmentation(cfg(tmp_path / "b", resume="auto"))
    a = load_checkpoint(tmp_path / "a/last.pth", "segment")
    b = load_checkpoint(tmp_path / "b/last.pth", "segment")
    assert a["iteration"] == b["iteration"] == 5
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=1e-6, msg=k)


def test_segmentation_scores_match_a_hand_count():
    """mIoU, mAcc and aAcc on a 2x4 label map counted by hand: 7 labelled pixels (one ignored), 3 classes present,
    a 4th absent from labels and predictions (left out of the means, as mmseg)."""
    from metaformer.tasks.dense.data import IGNORE_INDEX
    from metaformer.tasks.segmentation import evaluate_segmentation

    label = torch.tensor([[0, 0, 1, 1], [2, 2, IGNORE_INDEX, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 1]])

    class Fixed(torch.nn.Module):  # predicts `pred`, whatever the image
        num_classes = 4

        def forward(self, x):
            return torch.nn.functional.one_hot(pred, 4).permute(2, 0, 1)[None].float().expand(len(x), -1, -1, -1)

    res = evaluate_segmentation(Fixed(), [(torch.zeros(3, 2, 4), label)])
    # confusion (label x prediction): class 0: 1 right, 1 as class 1; class 1: 3 right; class 2: 1 right, 1 as 0
    assert res["aAcc"] == pytest.approx(5 / 7)
    assert res["IoU_per_class"] == [round(1 / 3, 4), 0.75, 0.5, None]  # tp / (label + prediction - tp)
    assert res["mIoU"] == pytest.approx((1 / 3 + 3 / 4 + 1 / 2) / 3)
    assert res["mAcc"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)


SIGTERM_IN_A_WORKER = """
import os, signal, sys
from pathlib import Path
from metaformer.cli import main
from metaformer.tasks.dense.data import CocoDetection

marker, read = Path(sys.argv[1]), CocoDetection.__getitem__

def getitem(self, idx):  # the first validation image read: SIGTERM to the whole process group, from a worker
    if not self.train and not marker.exists():
        marker.write_text(str(os.getpid()))
        os.killpg(os.getpgrp(), signal.SIGTERM)
    return read(self, idx)

CocoDetection.__getitem__ = getitem
sys.exit(main(sys.argv[2:]))
"""


def test_sigterm_to_the_process_group_during_an_evaluation_is_a_graceful_stop(tmp_path):
    """A scheduler's SIGTERM reaches every process of the group, DataLoader workers included: the workers leave it to
    the main process, so the evaluation finishes, the run saves, says how to continue and exits 130 (no "killed by
    signal" traceback), and the resumed run completes."""
    import subprocess
    import sys

    toy = make_toy_data(tmp_path / "toy", num_train=2, num_val=2, size=64)
    script, marker = tmp_path / "run.py", tmp_path / "signalled"
    script.write_text(SIGTERM_IN_A_WORKER)
    argv = [sys.executable, str(script), str(marker), "detect", "train", "--train-images",
            str(toy / "images/training"), "--train-ann", str(toy / "instances_training.json"), "--val-images",
            str(toy / "images/validation"), "--val-ann", str(toy / "instances_validation.json"), *TINY_CLI,
            "--fpn-channels", "16", "--min-size", "64", "--max-size", "64", "--batch-size", "2", "--workers", "1",
            "--warmup-iters", "0", "--epochs", "2", "--output", str(tmp_path / "det")]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    _, err = p.communicate(timeout=300)
    assert int(marker.read_text()) != p.pid  # a worker sent it, while the main process evaluated
    assert p.returncode == 130, err
    assert "Traceback" not in err and "killed by signal" not in err, err
    assert "stopped by SIGTERM" in err and "--resume auto" in err, err
    p = subprocess.run([*argv, "--resume", "auto"], capture_output=True, text=True, start_new_session=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    assert load_checkpoint(tmp_path / "det" / "last.pth", "detect")["epoch"] == 2
