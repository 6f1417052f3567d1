"""Our models in timm's own tools: `metaformer timm train.py ...` runs timm's scripts with our models
registered, and timm's data/optimizer/scheduler pipeline (what its train.py and validate.py are made of)
trains and evaluates them on the digits in ImageFolder layout. (timm's scripts themselves are not in
the pip package; the README shows the commands, run by hand with pytorch-image-models' train.py.)"""
import sys

import pytest
import timm
import torch
from digits import write_digits
from timm.data import create_dataset, create_loader, resolve_data_config
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

import metaformer
from metaformer.cli import main

ARCH = dict(depths=[1, 1, 1, 1], dims=[32, 64, 128, 256], img_size=32)


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory):
    return write_digits(tmp_path_factory.mktemp("digits"))


def test_the_runner_gives_timm_scripts_our_models(tmp_path, capsys):
    script = tmp_path / "script.py"
    script.write_text("import sys, timm\n"
                      "m = timm.create_model(sys.argv[1], pretrained=False)\n"
                      "print(type(m).__module__, m.variant)\n"
                      "sys.exit(3 if len(sys.argv) > 2 else 0)\n")
    argv, path = list(sys.argv), list(sys.path)
    assert main(["timm", str(script), "metaformer_poolformer_s12"]) == 0
    assert capsys.readouterr().out.strip() == "metaformer.models.metaformer poolformer_s12"
    assert main(["timm", str(script), "metaformer_ppaa_s12", "--extra"]) == 3  # the script's exit code
    assert (sys.argv, sys.path) == (argv, path)  # the script's argv and folder were the script's only
    assert main(["timm", str(tmp_path / "train.py")]) == 2
    assert "pytorch-image-models" in capsys.readouterr().err


def test_timm_scripts_are_found_in_the_clone_or_the_message_says_how_to_get_them(tmp_path, monkeypatch, capsys):
    """timm's train.py is not in its pip package: the message gives the clone of the installed version, and a bare
    name is then found in ./pytorch-image-models. In a fresh process (nothing imported timm before), the script
    builds our models."""
    import subprocess
    from importlib.metadata import version

    monkeypatch.chdir(tmp_path)
    assert main(["timm", "validate.py"]) == 2
    err = capsys.readouterr().err
    assert (f"git clone --depth 1 --branch v{version('timm')} https://github.com/huggingface/pytorch-image-models"
            in err and "finds them in ./pytorch-image-models" in err and len(err.splitlines()) == 1), err
    (tmp_path / "pytorch-image-models").mkdir()
    (tmp_path / "pytorch-image-models" / "validate.py").write_text(
        "import sys, timm\nprint(timm.create_model('metaformer_poolformer_s12', depths=[1, 1, 1, 1]).variant, "
        "sys.argv[1:])\n")
    out = subprocess.run([sys.executable, "-m", "metaformer", "timm", "validate.py", "--model", "x"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "poolformer_s12 ['--model', 'x']"


def test_timm_train_and_validate_pipeline_on_the_digits(digits_folder, tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("metaformer_poolformer_s12", pretrained=False, num_classes=10, **ARCH)
    cfg = resolve_data_config({}, model=model)
    assert cfg["input_size"] == (3, 32, 32) and cfg["crop_pct"] == 0.9 and cfg["interpolation"] == "bicubic"
    train = create_dataset("", root=str(digits_folder), split="train", is_training=True)
    val = create_dataset("", root=str(digits_folder), split="val")
    assert train.reader.class_to_idx == {str(i): i for i in range(10)}
    train_loader = create_loader(train, input_size=cfg["input_size"], batch_size=64, is_training=True, no_aug=True,
                                 mean=cfg["mean"], std=cfg["std"], num_workers=0, device=torch.device("cpu"))
    val_loader = create_loader(val, input_size=cfg["input_size"], batch_size=120, mean=cfg["mean"], std=cfg["std"],
                               crop_pct=cfg["crop_pct"], interpolation=cfg["interpolation"], num_workers=0,
                               device=torch.device("cpu"))
    optimizer = create_optimizer_v2(model, opt="adamw", lr=4e-3, weight_decay=0.05)
    scheduler, epochs = create_scheduler_v2(optimizer, sched="cosine", num_epochs=3, warmup_epochs=0)
    loss_fn = torch.nn.CrossEntropyLoss()
    for epoch in range(epochs):
        model.train()
        for x, y in train_loader:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()
        scheduler.step(epoch + 1)
    model.eval()
    hits = total = 0
    with torch.no_grad():
        for x, y in val_loader:
            hits += (model(x).argmax(1) == y).sum().item()
            total += len(y)
    assert total == 360 and hits / total > 0.5  # chance is 10%
    # timm's checkpoint (its state dict) loads into our model through our loader, with the same logits
    torch.save({"state_dict": model.state_dict(), "arch": "metaformer_poolformer_s12"}, tmp_path / "timm.pth.tar")
    ours = metaformer.create_model("poolformer_s12", num_classes=10, **ARCH)
    assert metaformer.load_weights(ours, tmp_path / "timm.pth.tar").layout == "timm"
    x = next(iter(val_loader))[0]
    with torch.no_grad():
        assert torch.equal(ours.eval()(x), model(x))
