"""Training: exact resume (kill and Ctrl-C), DDP with torchrun, NaN stop, config layering, the recipe's pieces."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from metaformer.cli import main
from metaformer.tasks.train_config import DEMO, TrainConfig, default_workers, resolve_config

# The built-in digits with a tiny network: ~1-3 s per epoch on one core.
TINY = ["--depths", "1", "1", "1", "1", "--dims", "8", "16", "24", "32", "--batch-size", "128", "--workers", "0",
        "--aa", "rand-m9-mstd0.5-inc1", "--mixup", "0.8", "--cutmix", "1.0", "--reprob", "0.25",
        "--drop-path", "0.1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def cli(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "metaformer", "train", *args], env=kw.pop("env", ENV),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def assert_identical(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def wait_for(path: Path, proc, timeout=300):
    t = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t < timeout
        time.sleep(0.05)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 3-epoch run (Mixup, RandAugment, erasing, drop path all on)."""
    out = tmp_path_factory.mktemp("ref")
    p = cli("--epochs", "3", "--output", str(out), *TINY)
    _, err = p.communicate()
    assert p.returncode == 0, err
    return out


def test_killed_run_resumes_bit_identical(reference, tmp_path):
    p = cli("--epochs", "3", "--output", str(tmp_path), *TINY)
    wait_for(tmp_path / "last.pth", p)
    p.kill()  # SIGKILL: no chance to clean up
    p.communicate()
    torch.load(tmp_path / "last.pth", weights_only=True)  # atomic writes: never half a file
    p = cli("--epochs", "3", "--output", str(tmp_path), "--resume", "auto", *TINY)
    out, err = p.communicate()
    assert p.returncode == 0, err
    assert "resumed from" in out
    assert_identical(weights(reference / "last.pth"), weights(tmp_path / "last.pth"))


def test_ctrl_c_saves_mid_epoch_and_resumes_bit_identical(reference, tmp_path):
    p = cli("--epochs", "3", "--output", str(tmp_path), *TINY)
    wait_for(tmp_path / "last.pth", p)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate()
    assert p.returncode == 130, err
    assert "saved" in err and "--resume auto" in err
    ckpt = torch.load(tmp_path / "last.pth", weights_only=True)  # must load without pickle
    assert ckpt["epoch"] >= 1
    p = cli("--epochs", "3", "--output", str(tmp_path), "--resume", "auto", *TINY)
    _, err = p.communicate()
    assert p.returncode == 0, err
    assert_identical(weights(reference / "last.pth"), weights(tmp_path / "last.pth"))


def test_checkpoint_contents_and_outputs(reference):
    ckpt = torch.load(reference / "last.pth", weights_only=True)
    for key in ("model", "optimizer", "scheduler", "scaler", "ema", "epoch", "step", "rng", "class_names",
                "model_config", "history"):
        assert key in ckpt
    assert ckpt["epoch"] == 3 and ckpt["class_names"] == [str(i) for i in range(10)]
    assert ckpt["model_config"]["dims"] == [8, 16, 24, 32]
    for name in ("best.pth", "config.yaml", "metrics.csv", "curves.png", "summary.json"):
        assert (reference / name).exists(), name
    assert list((reference / "tb").glob("events.out.tfevents.*"))
    assert len((reference / "metrics.csv").read_text().splitlines()) == 4
    summary = json.loads((reference / "summary.json").read_text())
    assert summary["best_top1"] == max(h["val_top1"] for h in ckpt["history"])
    cfg = yaml.safe_load((reference / "config.yaml").read_text())
    assert cfg["mixup"] == 0.8 and cfg["epochs"] == 3 and cfg["global_batch"] == 128


def test_torchrun_two_ranks_disjoint_samples_identical_weights(tmp_path):
    logs = tmp_path / "samples"
    logs.mkdir()
    env = {**ENV, "METAFORMER_SAMPLE_LOG": str(logs)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "metaformer", "train", "--epochs", "1", "--output", str(tmp_path / "run"), *TINY,
           "--batch-size", "64", "--accum-steps", "2"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    seen = [set(map(int, (logs / f"rank{r}.txt").read_text().split()[1:])) for r in range(2)]
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) == 1436  # 1,437 train images, the odd one dropped to keep shards equal
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2
    hashes = summary["weights_sha256_per_rank"]
    assert len(hashes) == 2 and hashes[0] == hashes[1]
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["global_batch"] == 256


def test_an_error_under_torchrun_is_one_line_from_rank_0_and_every_rank_exits_cleanly(reference):
    """A refusal under torchrun is printed once, by rank 0; every rank leaves the process group and exits 2 (no
    "terminate called" abort), torchrun's own failure report gives the line as the cause, and the folder is left
    as it was."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "metaformer", "train", "--epochs", "4", "--output", str(reference), *TINY]
    before = {p.name: p.stat().st_mtime for p in reference.iterdir()}
    p = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    line = f"metaformer train: error: --output {reference} already holds a run"
    assert sum(x.startswith(line) for x in p.stderr.splitlines()) == 1, p.stderr
    assert "terminate called" not in p.stderr and "SIGABRT" not in p.stderr, p.stderr
    # the first rank out exits 2 and torchrun's report names it as the cause (torchrun may stop a slower rank itself)
    cause = p.stderr[p.stderr.index("Root Cause (first observed failure):"):]
    assert "exitcode  : 2 " in cause and f"traceback : {line}" in cause, p.stderr
    assert {p.name: p.stat().st_mtime for p in reference.iterdir()} == before


def test_nan_loss_stops_with_step_and_checkpoint(tmp_path, capsys):
    rc = main(["train", "--epochs", "2", "--output", str(tmp_path), *TINY, "--lr", "1e30", "--warmup-epochs", "0"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "loss is nan at step" in err or "loss is inf at step" in err
    assert "Last good checkpoint" in err


def test_flags_beat_yaml_beat_defaults(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("epochs: 7\nbatch-size: 32\nsmoothing: 0.2\ndata: /some/imagenet\n")
    cfg = resolve_config({"epochs": 9, "lr": None}, str(f))
    assert (cfg.epochs, cfg.batch_size, cfg.smoothing) == (9, 32, 0.2)
    assert cfg.mixup == TrainConfig.mixup and cfg.img_size == 224  # paper defaults for real data
    demo = resolve_config({"epochs": 2})
    assert demo.img_size == DEMO["img_size"] and demo.epochs == 2
    f.write_text("epcohs: 3\n")
    with pytest.raises(ValueError, match="unknown option.*epcohs"):
        resolve_config({}, str(f))


def test_no_weight_decay_on_biases_norms_layer_scales():
    from timm.optim import create_optimizer_v2

    from metaformer import create_model

    model = create_model("poolformer_s12", depths=[1, 1, 1, 1], dims=[8, 16, 24, 32])
    opt = create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert no_decay == model.no_weight_decay()
    assert any("layer_scale" in n for n in no_decay) and any(n.endswith(".bias") for n in no_decay)


@pytest.mark.parametrize("name", ["poolformer_s12_imagenet.yaml", "digits_demo.yaml"])
def test_shipped_configs_resolve(name):
    path = Path(__file__).parents[1] / "configs" / name
    cfg = resolve_config({}, str(path))
    if name.startswith("digits"):
        assert all(getattr(cfg, k) == v for k, v in DEMO.items())  # the file spells out the built-in defaults
    else:
        assert cfg.batch_size * cfg.accum_steps * 8 == 4096 and cfg.base_lr * 4096 / 1024 == pytest.approx(4e-3)


def test_speed_and_memory_options_run(tmp_path):
    """EMA, bf16 autocast, channels_last, gradient checkpointing, accumulation and clipping together."""
    assert main(["train", "--epochs", "1", "--output", str(tmp_path), *TINY, "--batch-size", "64",
                 "--accum-steps", "2", "--ema", "--ema-decay", "0.9", "--amp", "bf16", "--channels-last",
                 "--grad-checkpointing", "--clip-grad", "1.0"]) == 0
    ckpt = torch.load(tmp_path / "last.pth", weights_only=True)
    assert ckpt["ema"] is not None and ckpt["step"] == 1436 // 128
    assert "ema_top1" in ckpt["history"][0]


def test_fast_training_flag_follows_the_plain_run(tmp_path, monkeypatch):
    """--fast-training (metaformer.fast.training) gives the plain run's losses, drop path and Mixup on."""
    from metaformer.fast import training

    calls = []
    for fn in (training.PoolMixer, training.MlpBranch):  # count the fast path's autograd Functions
        monkeypatch.setattr(fn, "apply", lambda *a, _apply=fn.apply: calls.append(1) or _apply(*a))
    hist, used = {}, {}
    for name, extra in (("plain", []), ("fast", ["--fast-training"])):
        out = tmp_path / name
        calls.clear()
        assert main(["train", "--epochs", "2", "--output", str(out), *TINY, "--batch-size", "64", *extra]) == 0
        hist[name], used[name] = torch.load(out / "last.pth", weights_only=True)["history"], len(calls)
    assert used["plain"] == 0 and used["fast"] > 0  # the flag switched the blocks to the fast path
    for a, b in zip(hist["plain"], hist["fast"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-3)


def test_fast_training_flag_refuses_a_model_it_cannot_speed_up(tmp_path, capsys):
    code = main(["train", "--epochs", "1", "--output", str(tmp_path), *TINY, "--model-kwargs",
                 "{token_mixers: identity}", "--fast-training"])
    assert code == 2 and "--fast-training covers PoolFormer blocks" in capsys.readouterr().err


def test_fp16_autocast_with_grad_scaler_on_the_cpu(tmp_path):
    """The GPU's fp16 recipe (autocast + GradScaler, channels_last, the fast path) runs on the CPU too: the
    scaler's state is live and saved, and the run learns (the digits are 10 classes: chance is 10%)."""
    assert main(["train", "--epochs", "1", "--output", str(tmp_path), *TINY, "--batch-size", "64", "--amp", "fp16",
                 "--channels-last", "--fast-training", "--drop-path", "0"]) == 0
    ckpt = torch.load(tmp_path / "last.pth", weights_only=True)
    assert ckpt["scaler"]["scale"] > 0 and ckpt["scaler"]["_growth_tracker"] >= 1
    assert ckpt["history"][-1]["val_top1"] > 20


def test_the_first_line_names_the_recipe_and_a_small_folder_gets_a_hint(tmp_path, capsys, monkeypatch):
    """The first line names the recipe and what was changed, the second the model as built (its depths and dims when
    they are not the variant's); `train --data ROOT` on a small folder, which runs the ImageNet recipe (300 epochs at
    224 px), adds a hint of what suits that many images."""
    from digits import write_digits

    from metaformer.engine.run import RunLock

    root = write_digits(tmp_path / "digits", classes=("0", "1"))
    n = len(list((root / "train").rglob("*.png")))
    assert main(["train", "--epochs", "1", "--output", str(tmp_path / "demo"), *TINY]) == 0
    first, second = capsys.readouterr().out.splitlines()[:2]
    # not "model: poolformer_s12" alone for a network at a fraction of its size
    assert "| model: poolformer_s12 with depths [1, 1, 1, 1], dims [8, 16, 24, 32], 0." in second, second
    assert first.startswith("recipe: the built-in digits' demo recipe, poolformer_s12, 1 epochs at 32px"), first
    assert "changed: depths [1, 1, 1, 1], dims [8, 16, 24, 32]" in first and "epochs 1" in first, first
    out = tmp_path / "run"
    out.mkdir()
    with RunLock(out):  # held, as by another run
        assert main(["train", "--data", str(root), "--output", str(out)]) == 2  # stops at the lock, after the hint
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("recipe: the papers' ImageNet recipe, poolformer_s12, 300 epochs at 224px, batch 128 "
                               f"per process, base lr 0.001, {default_workers()} worker(s); unchanged"), lines
    assert lines[1].startswith(f"hint: {n} training images, and the ImageNet recipe's 300 epochs at 224px") and \
        "--pretrained poolformer_s12 --epochs 30" in lines[1], lines


def test_workers_default_to_what_the_machine_has(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(2)))
    assert default_workers() == 2 and TrainConfig().workers == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert default_workers() == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun's ranks on this machine share its CPUs
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(12)))
    assert default_workers() == 3


def test_the_demo_recipe_on_other_data_is_named_as_such():
    from metaformer.tasks.train_config import describe_recipe

    root = Path(__file__).resolve().parents[1]
    cfg = resolve_config({"data": "runs/digits-folder", "output": "runs/folder"}, str(root / "configs/digits_demo.yaml"))
    assert describe_recipe(cfg).startswith("recipe: the built-in digits' demo recipe, poolformer_s12, 10 epochs at 32px")
    assert describe_recipe(cfg).endswith("; unchanged")
    assert describe_recipe(resolve_config({"data": "x", "epochs": 30})).endswith("changed: epochs 30")
