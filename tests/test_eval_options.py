"""eval/predict options: fused by default (same numbers as --no-fused), EMA weights, flip TTA, AMP, channels_last,
distributed evaluation under torchrun with exact counts, and predict over folders in batches."""
import json
import os
import subprocess
import sys

import pytest
import torch

from metaformer import data as D
from metaformer.cli import main

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TINY = ["--depths", "1", "1", "1", "1", "--dims", "16", "32", "48", "64", "--batch-size", "64", "--workers", "0"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """3 digits epochs with an EMA of decay 0.9 (so it differs from the weights it follows)."""
    out = tmp_path_factory.mktemp("ema")
    assert main(["train", "--epochs", "3", "--output", str(out), *TINY, "--ema", "--ema-decay", "0.9"]) == 0
    return out


def evaluate(capsys, *args):
    assert main(["eval", "--json", "--workers", "0", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_fused_by_default_with_the_same_numbers(run, capsys):
    fused = evaluate(capsys, "--checkpoint", str(run / "best.pth"))
    plain = evaluate(capsys, "--checkpoint", str(run / "best.pth"), "--no-fused")
    assert len(fused["speed"]) == 1 and fused["speed"][0].startswith("fused (") and plain["speed"] == []
    assert "blocks fused" in fused["speed"][0]
    assert fused["images"] == plain["images"] == 360
    assert fused["top1"] == plain["top1"] and fused["loss"] == pytest.approx(plain["loss"], abs=1e-5)
    cl = evaluate(capsys, "--checkpoint", str(run / "best.pth"), "--no-fused", "--channels-last")
    assert cl["speed"] == ["channels_last"] and cl["top1"] == plain["top1"]


def test_ema_weights_score_what_training_logged_for_them(run, capsys):
    ckpt = torch.load(run / "best.pth", weights_only=True)
    logged = ckpt["history"][-1]
    assert abs(logged["ema_loss"] - logged["val_loss"]) > 1e-4  # the EMA is another model
    ema = evaluate(capsys, "--checkpoint", str(run / "best.pth"), "--ema", "--no-fused")
    assert ema["top1"] == pytest.approx(logged["ema_top1"], abs=1e-9) and "EMA" in ema["source"]
    assert ema["loss"] == pytest.approx(logged["ema_loss"], abs=1e-6)
    plain = evaluate(capsys, "--checkpoint", str(run / "best.pth"), "--no-fused")
    assert plain["top1"] == pytest.approx(logged["val_top1"], abs=1e-9)
    assert plain["loss"] == pytest.approx(logged["val_loss"], abs=1e-6)


def test_ema_of_a_checkpoint_without_one_is_a_one_line_error(tmp_path, capsys):
    import metaformer

    f = tmp_path / "plain.safetensors"
    metaformer.save_weights(metaformer.create_model("poolformer_s12", img_size=32, num_classes=10,
                                                    depths=[1, 1, 1, 1], dims=[16, 32, 48, 64]), f,
                            class_names=list(D.Digits.classes))
    assert main(["eval", "--checkpoint", str(f), "--ema"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds no EMA weights" in err


def test_flip_tta_and_bf16_autocast(run, capsys):
    plain = evaluate(capsys, "--checkpoint", str(run / "best.pth"))
    flip = evaluate(capsys, "--checkpoint", str(run / "best.pth"), "--tta", "flip")
    assert flip["tta"] == "flip" and flip["images"] == 360 and flip["loss"] != plain["loss"]
    bf16 = evaluate(capsys, "--checkpoint", str(run / "best.pth"), "--amp", "bf16")
    assert bf16["amp"] == "bf16" and abs(bf16["top1"] - plain["top1"]) < 2.0


def test_distributed_eval_counts_every_image_once(run, capsys):
    single = evaluate(capsys, "--checkpoint", str(run / "best.pth"), "--batch-size", "64")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "metaformer",
           "eval", "--checkpoint", str(run / "best.pth"), "--json", "--workers", "0", "--batch-size", "64"]
    p = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    both = json.loads(p.stdout)  # rank 0 alone prints
    assert both["processes"] == 2 and both["images"] == 360
    assert both["top1"] == pytest.approx(single["top1"], abs=1e-9)
    assert both["loss"] == pytest.approx(single["loss"], abs=1e-5)


def test_predict_reads_folders_in_batches(run, tmp_path, capsys):
    val = D.Digits("val", 32)
    folder = tmp_path / "digits"
    folder.mkdir()
    for i in range(11):
        val.images[i].save(folder / f"{i:02d}.png")
    outs = []
    for batch in ("1", "4"):
        assert main(["predict", str(folder), "--checkpoint", str(run / "best.pth"), "--json", "--batch-size",
                     batch]) == 0
        outs.append(json.loads(capsys.readouterr().out))
    assert [r["image"] for r in outs[0]] == [str(folder / f"{i:02d}.png") for i in range(11)]
    for a, b in zip(*outs):
        assert [n for n, _ in a["predictions"]] == [n for n, _ in b["predictions"]]
        assert a["predictions"][0][1] == pytest.approx(b["predictions"][0][1], abs=1e-5)
