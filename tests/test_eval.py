"""The built-in demo end to end: train (short), eval reproduces the logged accuracy, predict names digits."""
import json

import numpy as np
import pytest
import torch
from digits import write_digits

from metaformer import data as D
from metaformer.cli import main


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The README demo's defaults (half-size S12 at 32 px), shortened to 2 epochs."""
    out = tmp_path_factory.mktemp("demo")
    assert main(["train", "--epochs", "2", "--output", str(out)]) == 0
    return out


def test_demo_is_far_above_chance(demo):
    summary = json.loads((demo / "summary.json").read_text())
    assert summary["best_top1"] > 60  # chance is 10%
    assert torch.load(demo / "best.pth", weights_only=True)["model_config"]["dims"] == [32, 64, 128, 256]


def test_eval_reproduces_training_accuracy(demo, capsys):
    summary = json.loads((demo / "summary.json").read_text())
    # No MODEL, no architecture flags: the checkpoint carries its config and class names.
    assert main(["eval", "--checkpoint", str(demo / "best.pth"), "--json", "--workers", "0"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 360
    assert result["top1"] == pytest.approx(summary["best_top1"], abs=1e-9)


def test_eval_on_a_class_folder_and_safetensors(demo, tmp_path, capsys):
    from metaformer.tasks.inference import load_for_inference
    from metaformer.weights import save_weights

    loaded = load_for_inference(None, str(demo / "best.pth"))
    save_weights(loaded.model, tmp_path / "digits.safetensors", class_names=loaded.class_names)
    folder = write_digits(tmp_path / "folder", splits=("val",), limit=40) / "val"
    assert main(["eval", "--checkpoint", str(tmp_path / "digits.safetensors"), "--data", str(folder),
                 "--json", "--workers", "0"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 40 and result["top1"] > 50


def test_predict_names_the_digit(demo, tmp_path, capsys):
    val = D.Digits("val", 32)
    paths = []
    for i in range(20):
        paths.append(tmp_path / f"digit{i}.png")
        val.images[i].save(paths[-1])
    assert main(["predict", "--checkpoint", str(demo / "best.pth"), *map(str, paths), "--topk", "3", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert all(len(r["predictions"]) == 3 for r in results)
    assert all(r["predictions"][0][0] in D.Digits.classes for r in results)
    hits = np.mean([r["predictions"][0][0] == str(t) for r, t in zip(results, val.targets[:20])])
    assert hits > 0.5


def test_bad_inputs_are_one_line_errors(demo, tmp_path, capsys):
    assert main(["predict", "--checkpoint", str(demo / "best.pth"), str(tmp_path / "missing.png")]) == 2
    assert "missing.png does not exist" in capsys.readouterr().err
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "x.png").write_bytes(b"")
    assert main(["eval", "--checkpoint", str(demo / "best.pth"), "--data", str(tmp_path)]) == 2
    assert "no class sub-folders" in capsys.readouterr().err
    assert main(["predict", "not_a_model", "x.png"]) == 2
    assert "not a model name" in capsys.readouterr().err


def test_imagenet_class_names():
    from metaformer.tasks.inference import imagenet_class_names

    names = imagenet_class_names()
    assert len(names) == 1000 and names[0] == "tench"


def test_fused_bf16_agrees_with_fp32_on_real_digits(demo):
    """Top-1 of the fused bf16 model agrees with fp32 on at least 99% of the real digits."""
    import metaformer
    from metaformer.tasks.inference import load_for_inference

    loaded = load_for_inference(None, str(demo / "best.pth"))
    ds = D.Digits("val", loaded.img_size, loaded.transform)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.no_grad():
        fp32 = loaded.model(x).argmax(1)
        bf16 = metaformer.fuse(loaded.model).to(torch.bfloat16)(x.to(torch.bfloat16)).float().argmax(1)
    agreement = (bf16 == fp32).float().mean().item()
    assert agreement >= 0.99, f"fused bf16 agrees with fp32 on only {agreement:.1%} of the 360 digits"
