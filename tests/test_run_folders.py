"""A run folder never loses work: no start-over without --overwrite, one writer at a time, no resume from broken
weights, a full disk named as such, names longer than file systems allow refused before anything is written."""
import errno
import io
import json
import os
import shutil
import socket
import subprocess

import pytest
import torch

from digits import write_digits
from metaformer import atomic
from metaformer.cli import main
from metaformer.engine import checkpoint as ckpt_io
from metaformer.engine.loop import check_finite
from metaformer.engine.stop import TrainingDiverged
from metaformer.tasks.dense.data import make_toy_data

NET = ["--depths", "1", "1", "1", "1", "--dims", "8", "16", "24", "32", "--img-size", "32", "--batch-size", "4",
       "--workers", "0"]
DENSE = ["--override", "depths=[1,1,1,1]", "--override", "dims=[8,16,24,32]", "--fpn-channels", "8", "--min-size",
         "32", "--max-size", "64", "--batch-size", "2", "--workers", "0", "--warmup-iters", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_digits(tmp_path_factory.mktemp("data"), classes=("0", "1"), per_class=4)


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    """A run of 2 epochs (kept pristine; tests copy it)."""
    out = tmp_path_factory.mktemp("run") / "run"
    assert train(data, out, "--epochs", "2") == 0
    return out


def train(data, out, *argv):
    return main(["train", "--data", str(data), *NET, "--output", str(out), *argv])


def error_line(capsys, verb="train") -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith(f"metaformer {verb}:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


# ----------------------------------------------------------------------------- --resume auto without last.pth

@pytest.mark.parametrize("how", ["deleted", "a folder"])
def test_resume_auto_without_last_pth_never_starts_a_run_over(data, finished, tmp_path, capsys, how):
    """--resume auto in a folder that holds a run but no last.pth (deleted, or a folder in its place) is refused,
    leaving the folder as it was and naming the ways on (--resume best.pth, --overwrite); the first works."""
    run = shutil.copytree(finished, tmp_path / "run")
    (run / "last.pth").unlink()
    if how == "a folder":
        (run / "last.pth").mkdir()
    before = snapshot(run)
    assert train(data, run, "--epochs", "3", "--resume", "auto") == 2
    err = error_line(capsys)
    if how == "deleted":
        assert "holds a run (best.pth, summary.json, metrics.jsonl with 2 row(s)) but no last.pth to continue from" \
            in err and f"--resume {run}/best.pth" in err and "--overwrite" in err
    else:
        assert "last.pth is not a checkpoint file" in err
    assert snapshot(run) == before
    if how == "deleted":  # the way out it names works
        assert train(data, run, "--epochs", "3", "--resume", str(run / "best.pth")) == 0
        assert torch.load(run / "last.pth", weights_only=True)["epoch"] == 3


def test_resume_auto_with_overwrite_and_no_last_pth_starts_over(data, finished, tmp_path):
    run = shutil.copytree(finished, tmp_path / "run")
    (run / "last.pth").unlink()
    assert train(data, run, "--epochs", "1", "--resume", "auto", "--overwrite") == 0
    assert torch.load(run / "last.pth", weights_only=True)["epoch"] == 1
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1  # the old run's 2 rows are gone


def test_resume_auto_after_a_kill_in_the_first_epoch_starts_from_scratch(data, tmp_path, capsys):
    """A run killed before its first checkpoint left only its config and an empty log: nothing to lose."""
    run = tmp_path / "run"
    assert train(data, run, "--epochs", "1") == 0
    for name in ("last.pth", "best.pth", "summary.json", "curves.png"):
        (run / name).unlink()
    (run / "metrics.jsonl").write_text("")
    assert train(data, run, "--epochs", "1", "--resume", "auto") == 0
    assert "starting from scratch" in capsys.readouterr().out


# ----------------------------------------------------------------------------- one writer per folder

def lock_of(pid: int) -> str:
    return json.dumps({"pid": pid, "host": socket.gethostname(), "start": ckpt_io._process_start(pid),
                       "since": "2025-01-01 00:00:00"})


def test_a_second_run_into_a_folder_being_written_is_refused(data, finished, tmp_path, capsys):
    """A run into a folder another live run is writing is refused, naming the process and the lock to delete if it
    is gone, and the folder is left as it was; the lock of a process that is gone is taken over."""
    run = shutil.copytree(finished, tmp_path / "run")
    other = subprocess.Popen(["sleep", "60"])  # a live process that holds the folder
    try:
        (run / ckpt_io.RunLock.NAME).write_text(lock_of(other.pid))
        before = snapshot(run)
        assert train(data, run, "--epochs", "3", "--resume", "auto") == 2
        err = error_line(capsys)
        assert f"is being written by another run (process {other.pid} on {socket.gethostname()}" in err
        assert "Wait for it to end" in err and f"delete {run / ckpt_io.RunLock.NAME}" in err
        assert snapshot(run) == before
    finally:
        other.kill()
        other.wait()
    # the holder is gone: its lock is stale, taken over, and released at the end
    assert train(data, run, "--epochs", "3", "--resume", "auto") == 0
    assert "taken over from a run that is gone" in capsys.readouterr().out
    assert not (run / ckpt_io.RunLock.NAME).exists()


def test_a_lock_is_released_when_a_run_fails_and_a_reused_pid_is_not_an_owner(data, tmp_path, capsys):
    assert train(data, tmp_path / "run", "--epochs", "1", "--lr", "1e30") == 2  # diverges
    assert "nan" in error_line(capsys).lower()
    assert not (tmp_path / "run" / ckpt_io.RunLock.NAME).exists()
    lock = ckpt_io.RunLock(tmp_path)
    (tmp_path / lock.NAME).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                   "start": "1", "since": "then"}))  # this pid, another start
    lock.acquire()
    assert json.loads((tmp_path / lock.NAME).read_text())["start"] == ckpt_io._process_start(os.getpid())
    lock.release()
    assert not (tmp_path / lock.NAME).exists()


def test_two_detection_runs_into_one_folder(tmp_path, capsys):
    toy = make_toy_data(tmp_path / "toy", num_train=2, num_val=1, size=64)
    argv = ["detect", "train", "--train-images", str(toy / "images/training"), "--train-ann",
            str(toy / "instances_training.json"), *DENSE, "--epochs", "1", "--output", str(tmp_path / "det")]
    assert main(argv) == 0
    (tmp_path / "det" / ckpt_io.RunLock.NAME).write_text(lock_of(os.getpid()))  # this very process holds it
    assert main([*argv, "--epochs", "2", "--resume", "auto"]) == 2
    assert "is being written by another run" in error_line(capsys, "detect")


# ----------------------------------------------------------------------------- NaN weights

def test_resume_from_nan_weights_is_refused_at_load(data, finished, tmp_path, capsys):
    """Resuming from a last.pth with NaN weights is refused at load; a NaN stop names a checkpoint with finite
    weights (best.pth) as the last good one."""
    run = shutil.copytree(finished, tmp_path / "run")
    ckpt = torch.load(run / "last.pth", weights_only=True)
    ckpt["model"]["head.fc.weight"][0, 0] = float("nan")
    torch.save(ckpt, run / "last.pth")
    before = snapshot(run)
    assert train(data, run, "--epochs", "3", "--resume", "auto") == 2
    err = error_line(capsys)
    assert "last.pth holds NaN or inf weights (1 tensor(s), e.g. head.fc.weight)" in err
    assert snapshot(run) == before
    # the NaN stop names a checkpoint whose weights are finite, not the broken last.pth
    with pytest.raises(TrainingDiverged, match=rf"Last good checkpoint: {run / 'best.pth'} \(resume with --resume"):
        check_finite(float("nan"), "step 9", run, "none")


# ----------------------------------------------------------------------------- empty checkpoints

def test_an_empty_last_pth_is_a_one_line_error_everywhere(data, tmp_path, capsys):
    """An empty last.pth is one line ("is empty (0 bytes)") from train, detect eval and detect train."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pth").write_bytes(b"")
    assert train(data, run, "--epochs", "1", "--resume", "auto") == 2
    assert "last.pth is empty (0 bytes)" in error_line(capsys)
    toy = make_toy_data(tmp_path / "toy", num_train=2, num_val=1, size=64)
    assert main(["detect", "eval", "--checkpoint", str(run / "last.pth"), "--images",
                 str(toy / "images/validation"), "--ann", str(toy / "instances_validation.json")]) == 2
    assert "last.pth is empty (0 bytes)" in error_line(capsys, "detect")
    assert main(["detect", "train", "--train-images", str(toy / "images/training"), "--train-ann",
                 str(toy / "instances_training.json"), *DENSE, "--output", str(run), "--resume", "auto"]) == 2
    assert "last.pth is empty (0 bytes)" in error_line(capsys, "detect")


# ----------------------------------------------------------------------------- full disk

def test_a_full_disk_inside_torch_save_is_named(tmp_path, monkeypatch):
    """A full disk inside torch.save (whose writer turns ENOSPC into "RuntimeError: ... unexpected pos") is reported
    as a full disk, with the previous checkpoint intact."""
    path = tmp_path / "last.pth"
    ckpt_io.save({"model": {"w": torch.zeros(4)}}, path)
    before = path.read_bytes()

    class Full(io.FileIO):
        written = 0

        def write(self, b):
            self.written += len(b)
            if self.written > 4096:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(b)

    monkeypatch.setattr(atomic, "open", lambda p, mode: Full(p, "w"), raising=False)
    with pytest.raises(ckpt_io.CheckpointError, match=rf"disk full while writing {path}: the previous last.pth is "
                                                      "intact. Free some space and continue with --resume auto"):
        ckpt_io.save({"model": {"w": torch.randn(100_000)}}, path)
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]


# ----------------------------------------------------------------------------- long names

def test_names_longer_than_file_systems_allow(data, tmp_path, capsys):
    """A name longer than file systems allow is one line from train, detect and export; a legal 245-character name
    works, its temporary file's name staying within 255 bytes."""
    long = tmp_path / ("r" * 300)
    assert train(data, long, "--epochs", "1") == 2
    assert "is 300 bytes long, and file systems allow at most 255 per name" in error_line(capsys)
    toy = make_toy_data(tmp_path / "toy", num_train=2, num_val=1, size=64)
    assert main(["detect", "train", "--train-images", str(toy / "images/training"), "--train-ann",
                 str(toy / "instances_training.json"), *DENSE, "--output", str(long)]) == 2
    assert "is 300 bytes long" in error_line(capsys, "detect")
    model = tmp_path / "m"
    assert train(data, model, "--epochs", "1") == 0
    assert main(["export", "--checkpoint", str(model / "best.pth"), "--output", str(long / "x.onnx")]) == 2
    assert "is 300 bytes long" in error_line(capsys, "export")
    name = tmp_path / ("e" * 240 + ".onnx")  # 245 characters: a legal name
    assert main(["export", "--checkpoint", str(model / "best.pth"), "--output", str(name)]) == 0
    assert name.is_file() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert len(atomic.temp_file(tmp_path / ("t" * 255)).name.encode()) <= 255


# ----------------------------------------------------------------------------- read-only outputs

@pytest.mark.parametrize("verb", ["export", "cam", "data pack", "convert", "ablate", "bench", "detect predict"])
def test_an_unwritable_output_is_refused_before_the_work(data, finished, verb, capsys):
    """An output in a read-only place is one line from each verb, before any work (bench before benchmarking)."""
    ckpt, image = str(finished / "best.pth"), str(next((data / "val/0").iterdir()))
    argv = {"export": ["export", "--checkpoint", ckpt, "--output", "/sys/mf/m.onnx"],
            "cam": ["cam", "--checkpoint", ckpt, image, "--output", "/sys/mf/cam"],
            "data pack": ["data", "pack", str(data), "/sys/mf/shards"],
            "convert": ["convert", ckpt, "/sys/mf/c.safetensors", "--to", "ours"],
            "ablate": ["ablate", "--rows", "baseline", "--set", "epochs=1", "--output", "/sys/mf/grid"],
            "bench": ["bench", "--img-size", "32", "--batch-size", "1", "--modes", "eager", "--repeats", "1",
                      "--no-memory", "--output", "/sys/mf/b.json"],
            "detect predict": ["detect", "predict", image, "--checkpoint", ckpt, "--output", "/sys/mf/pred"]}[verb]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "inference:" not in captured.err + captured.out
    line = [x for x in captured.err.splitlines() if x.startswith(f"metaformer {verb.split()[0]}: error:")]
    assert len(line) == 1 and "cannot write to" in line[0] and "/sys/mf" in line[0] and "read-only" in line[0]


# ----------------------------------------------------------------------------- a failed start leaves nothing

def test_a_run_that_fails_before_training_leaves_no_folder_and_the_retry_runs(data, tmp_path, capsys):
    """A folder counts as a run only once training has started: a failure before the first step removes what the
    run created (before: config.yaml and the logs stayed, and the same command then said "already holds a run")."""
    wrong = tmp_path / "wrong.safetensors"
    import metaformer

    metaformer.save_weights(metaformer.create_model("poolformer_s24"), wrong)
    out = tmp_path / "runs" / "new"  # neither folder exists yet
    assert train(data, out, "--epochs", "1", "--pretrained", str(wrong)) == 2
    assert "poolformer_s24" in error_line(capsys)
    assert not (tmp_path / "runs").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("kept")  # a folder the user made: only what the run wrote goes
    assert train(data, mine, "--epochs", "1", "--pretrained", str(wrong)) == 2
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    assert train(data, out, "--epochs", "1") == 0  # the same command, fixed, is not refused
    assert (out / "last.pth").is_file()


def test_a_detection_run_that_fails_before_its_first_step_leaves_no_folder(tmp_path, capsys):
    toy = make_toy_data(tmp_path / "toy", num_train=2, num_val=1, size=64)
    for image in (toy / "images/training").iterdir():
        image.write_bytes(b"not an image")  # found unreadable while the first pass runs
    out = tmp_path / "det"
    assert main(["detect", "train", "--train-images", str(toy / "images/training"), "--train-ann",
                 str(toy / "instances_training.json"), *DENSE, "--epochs", "1", "--output", str(out)]) == 2
    assert "unreadable" in error_line(capsys, "detect")
    assert not out.exists()


def test_a_grid_whose_first_row_fails_before_training_leaves_no_grid(tmp_path, capsys):
    """An ablation grid whose first row fails before training leaves no grid folder, so the corrected command runs."""
    out = tmp_path / "grid"
    tiny = ["--rows", "baseline", "--output", str(out), "--set", "depths=[1,1,1,1]", "--set", "dims=[8,8,8,8]",
            "--set", "epochs=1"]
    assert main(["ablate", *tiny, "--set", f"pretrained={tmp_path / 'missing.pth'}"]) == 2
    assert "missing.pth" in error_line(capsys, "ablate")
    assert not out.exists()
    assert main(["ablate", *tiny]) == 0
    assert (out / "report.md").is_file()
