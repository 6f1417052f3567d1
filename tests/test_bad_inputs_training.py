"""Ordinary and hostile inputs to `metaformer train`: changed options on resume, kills between writes,
configs, output folders, full disks. Each test asserts the applied change, the refusal or the one-line
error, and that nothing was lost."""
import errno
import os
import shutil

import pytest
import torch
import yaml

from metaformer.atomic import atomic_path, clean_stale_temps, temp_file
from metaformer.cli import main
from metaformer.tasks.train_config import resolve_config

TINY = ["--depths", "1", "1", "1", "1", "--dims", "8", "16", "24", "32", "--batch-size", "128", "--workers", "0"]


def train(*argv):
    return main(["train", *TINY, *argv])


def one_line_error(capsys, *argv) -> str:
    """The error line (progress bars of a run that had started may come before it on stderr)."""
    assert train(*argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("metaformer train:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def weights(path):
    return torch.load(path, weights_only=True)["model"]


@pytest.fixture(scope="module")
def after_epoch_1(tmp_path_factory):
    """A run stopped after epoch 1 of 3 (kept pristine; tests copy it)."""
    out = tmp_path_factory.mktemp("e1") / "run"
    assert train("--epochs", "1", "--output", str(out)) == 0
    return out


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------- changed options on resume

def test_a_changed_lr_on_resume_is_applied_and_logged(after_epoch_1, tmp_path, capsys):
    """--lr given on resume changes the weights from there on, is logged as a change, and goes into config.yaml (the
    first run's config kept as config.1.yaml)."""
    same = copy_run(after_epoch_1, tmp_path / "same")
    changed = copy_run(after_epoch_1, tmp_path / "changed")
    assert train("--epochs", "2", "--output", str(same), "--resume", "auto") == 0
    capsys.readouterr()
    assert train("--epochs", "2", "--output", str(changed), "--resume", "auto", "--lr", "0.05") == 0
    log = capsys.readouterr().out
    assert "options changed since the checkpoint, applied from here on: epochs 1 -> 2, lr None -> 0.05" in log
    a, b = weights(same / "last.pth"), weights(changed / "last.pth")
    assert any(not torch.equal(a[k], b[k]) for k in a)
    ckpt = torch.load(changed / "last.pth", weights_only=True)
    assert ckpt["train_config"]["lr"] == 0.05 and ckpt["optimizer"]["param_groups"][0]["lr"] < 0.05 + 1e-12
    # the original config.yaml is kept, the new one describes the resumed run
    assert yaml.safe_load((changed / "config.1.yaml").read_text())["lr"] is None
    assert yaml.safe_load((changed / "config.yaml").read_text())["lr"] == 0.05


def test_a_changed_batch_size_or_class_list_on_resume_is_refused(after_epoch_1, tmp_path, capsys):
    run = copy_run(after_epoch_1, tmp_path / "run")
    before = (run / "last.pth").read_bytes()
    err = one_line_error(capsys, "--epochs", "2", "--output", str(run), "--resume", "auto", "--batch-size", "64")
    assert "--batch-size 128 -> 64" in err and "cannot change them midway" in err
    err = one_line_error(capsys, "--epochs", "2", "--output", str(run), "--resume", "auto", "--seed", "3")
    assert "--seed 0 -> 3" in err
    data = tmp_path / "data"
    from PIL import Image
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            (data / split / c).mkdir(parents=True)
            for i in range(70):  # enough for one step of the checkpoint's batch of 128
                Image.new("RGB", (32, 32), (i, 0, 0)).save(data / split / c / f"{i}.png")
    err = one_line_error(capsys, "--epochs", "2", "--output", str(run), "--resume", "auto", "--data", str(data),
                         "--img-size", "32", "--batch-size", "128")
    assert "was trained on other classes" in err
    assert (run / "last.pth").read_bytes() == before  # nothing was touched


# ----------------------------------------------------------------------------- best/last and temp files

def test_a_kill_between_last_and_best_is_reconciled_on_resume(after_epoch_1, tmp_path, capsys):
    """A folder whose best.pth is missing though last.pth is the best epoch (a kill between the two writes; best.pth
    is written first) has best.pth brought up to date on resume."""
    run = copy_run(after_epoch_1, tmp_path / "run")
    ckpt = torch.load(run / "last.pth", weights_only=True)
    assert ckpt["best_epoch"] == ckpt["epoch"] == 1
    (run / "best.pth").unlink()  # best.pth missing beside the best epoch's last.pth: a kill between the two writes
    assert train("--epochs", "1", "--output", str(run), "--resume", "auto") == 2
    err = capsys.readouterr()
    assert "already finished 1 of 1 epochs" in err.err
    assert "best.pth was missing: brought up to date" in err.out
    assert torch.equal(weights(run / "best.pth")["head.fc.weight"], weights(run / "last.pth")["head.fc.weight"])


def test_best_is_written_before_last(after_epoch_1, tmp_path, monkeypatch):
    from metaformer.engine import checkpoint as C

    order = []
    real = C.save
    monkeypatch.setattr(C, "save", lambda state, path: (order.append(os.path.basename(path)), real(state, path))[1])
    run = copy_run(after_epoch_1, tmp_path / "run")
    assert train("--epochs", "2", "--output", str(run), "--resume", "auto") == 0
    assert order[-2:] == ["best.pth", "last.pth"] or order[-1:] == ["last.pth"]
    assert "best.pth" not in order or order.index("best.pth") < order.index("last.pth")


def test_orphan_temp_files_of_killed_writers_are_removed(after_epoch_1, tmp_path):
    run = copy_run(after_epoch_1, tmp_path / "run")
    dead = (run / ".last.pth.999999999.abcd1234.tmp")  # no such process
    dead.write_bytes(b"half a checkpoint")
    mine = temp_file(run / "best.pth")  # a live writer (this process): kept
    assert clean_stale_temps(run) == [dead] and mine.exists() and not dead.exists()
    mine.unlink()
    dead.write_bytes(b"half a checkpoint")
    assert train("--epochs", "2", "--output", str(run), "--resume", "auto") == 0
    assert not dead.exists() and not list(run.glob(".*.tmp"))


def test_atomic_path_renames_only_a_result_that_passed(tmp_path):
    """The writers that take a file name (export, convert) write beside the target: the result appears only when
    the block ends without an error, a refused one leaves nothing, and a killed writer's folder is cleaned."""
    target = tmp_path / "model.onnx"
    with pytest.raises(ValueError):
        with atomic_path(target) as tmp:
            assert tmp.name == "model.onnx" and tmp.parent.parent == tmp_path
            tmp.write_bytes(b"disagrees with the model")
            raise ValueError("check failed")
    assert list(tmp_path.iterdir()) == []
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"checked")
    assert target.read_bytes() == b"checked" and list(tmp_path.iterdir()) == [target]
    dead = tmp_path / ".hf.999999999.abcd1234.tmp"  # a folder left by a killed convert (no such process)
    (dead / "hf").mkdir(parents=True)
    assert clean_stale_temps(tmp_path) == [dead] and not dead.exists() and target.exists()


# ----------------------------------------------------------------------------- output folders, disks

def test_a_second_run_in_the_same_folder_is_refused_unless_resumed_or_overwritten(after_epoch_1, tmp_path, capsys):
    run = copy_run(after_epoch_1, tmp_path / "run")
    before = (run / "last.pth").read_bytes()
    err = one_line_error(capsys, "--epochs", "1", "--output", str(run))
    assert "already holds a run" in err and "--resume auto" in err and "--overwrite" in err
    assert (run / "last.pth").read_bytes() == before
    (run / "config.1.yaml").write_text("old: 1\n")
    assert train("--epochs", "1", "--output", str(run), "--overwrite", "--seed", "5") == 0
    assert not (run / "config.1.yaml").exists()
    assert torch.load(run / "last.pth", weights_only=True)["train_config"]["seed"] == 5


def test_unusable_output_folders_are_refused_before_training(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    err = one_line_error(capsys, "--epochs", "1", "--output", str(tmp_path / "file"))
    assert "is a file, not a folder" in err
    err = one_line_error(capsys, "--epochs", "1", "--output", str(tmp_path / "file" / "run"))
    assert "is a file, so the folder cannot be created" in err
    err = one_line_error(capsys, "--epochs", "1", "--output", "/sys/metaformer-run")  # read-only, even for root
    assert "cannot write to --output /sys/metaformer-run" in err


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(after_epoch_1, tmp_path, capsys, monkeypatch):
    run = copy_run(after_epoch_1, tmp_path / "run")
    before = (run / "last.pth").read_bytes()

    def full(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    err = one_line_error(capsys, "--epochs", "2", "--output", str(run), "--resume", "auto")
    assert "disk full while writing" in err and "is intact" in err and "--resume auto" in err
    monkeypatch.undo()
    assert (run / "last.pth").read_bytes() == before and not list(run.glob(".*.tmp"))


# ----------------------------------------------------------------------------- configs

def test_yaml_numbers_types_and_syntax(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 1e-3\nweight_decay: 5e-2\nepochs: 2\n")
    resolved = resolve_config({}, str(cfg))
    assert resolved.lr == 0.001 and resolved.weight_decay == 0.05 and isinstance(resolved.lr, float)
    cfg.write_text("epochs: ten\n")
    err = one_line_error(capsys, "--config", str(cfg), "--output", str(tmp_path / "r"))
    assert "epochs must be an integer, got 'ten' (str)" in err
    cfg.write_text("lr: [1, 2\nepochs: 2\n")
    err = one_line_error(capsys, "--config", str(cfg), "--output", str(tmp_path / "r"))
    assert "invalid YAML at line 2" in err
    cfg.write_text("mixup: yes please\n")
    err = one_line_error(capsys, "--config", str(cfg), "--output", str(tmp_path / "r"))
    assert "mixup must be a number" in err
    err = one_line_error(capsys, "--config", str(tmp_path / "none.yaml"), "--output", str(tmp_path / "r"))
    assert "none.yaml does not exist" in err
    assert not (tmp_path / "r").exists()
