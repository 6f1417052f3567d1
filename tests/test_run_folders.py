"""A run folder never loses work: no start-over without --overwrite, one writer at a time, no resume from broken
weights, a full disk named as such, names longer than file systems allow refused before anything is written."""
import errno
import io
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from digits import write_digits
from metaformer import atomic
from metaformer.cli import main
from metaformer.engine import checkpoint as ckpt_io
from metaformer.engine.loop import check_finite
from metaformer.engine.run import RunLock
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


def run_files(folder):
    """The run's own files (not the lock), with their bytes."""
    return {k: v for k, v in snapshot(folder).items() if not k.startswith(".metaformer")}


@pytest.mark.parametrize("failure", ["--pretrained offline", "diverges in its first epoch"])
def test_overwrite_replaces_a_run_only_once_the_new_one_has_a_checkpoint(data, finished, tmp_path, capsys, failure,
                                                                       monkeypatch):
    """--overwrite sets the earlier run aside; a new run that fails before its first checkpoint puts it back."""
    run = shutil.copytree(finished, tmp_path / "run")
    before = run_files(run)
    if failure.endswith("offline"):  # the published weights, not in an empty cache, without network
        monkeypatch.setenv("METAFORMER_CACHE", str(tmp_path / "cache"))
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        argv = ["--pretrained", "poolformer_s12"]
    else:
        argv = ["--lr", "1e30"]
    assert train(data, run, "--epochs", "1", "--overwrite", *argv) == 2
    out, err = capsys.readouterr()
    assert ("offline" if failure.endswith("offline") else "nan") in err.lower() and "Traceback" not in err, err
    assert "the earlier run --overwrite would have replaced is back in place" in out
    assert run_files(run) == before and (run / "tb").is_dir()
    assert not (run / ".metaformer.previous").exists()
    # a replacement that reaches its first checkpoint replaces the run
    assert train(data, run, "--epochs", "1", "--overwrite") == 0
    assert run_files(run) != before and not (run / ".metaformer.previous").exists()
    assert len(torch.load(run / "last.pth", weights_only=True)["history"]) == 1


def test_a_run_set_aside_by_a_killed_overwrite_is_put_back(data, finished, tmp_path, capsys):
    """A run killed outright after --overwrite set the earlier run aside (nothing could put it back then): the next
    command in the folder finds it and puts it back first."""
    run = shutil.copytree(finished, tmp_path / "run")
    before = run_files(run)
    aside = run / ".metaformer.previous"
    aside.mkdir()
    for name in ("last.pth", "best.pth", "metrics.csv", "metrics.jsonl", "config.yaml", "summary.json", "curves.png"):
        (run / name).rename(aside / name)
    (run / "config.yaml").write_text("the killed run's own config\n")
    assert train(data, run, "--epochs", "3", "--resume", "auto") == 0
    out = capsys.readouterr().out
    assert "put back the run that an interrupted --overwrite had set aside" in out
    assert "resumed from" in out and "epoch 3" in out  # the earlier run, continued from its last.pth
    assert not aside.exists() and run_files(run).keys() >= before.keys()


# ----------------------------------------------------------------------------- one writer per folder

def hold_lock(folder):
    """Another live process holding ``folder``'s lock, as a running `metaformer train` would."""
    code = ("import sys, time; from metaformer.engine.run import RunLock; lock = RunLock(sys.argv[1]); lock.acquire(); "
            "print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_run_into_a_folder_being_written_is_refused(data, finished, tmp_path, capsys):
    """Two `--resume auto` runs on one folder: the second is refused, naming the first, and changes nothing."""
    run = shutil.copytree(finished, tmp_path / "run")
    other = hold_lock(run)
    try:
        before = snapshot(run)
        assert train(data, run, "--epochs", "3", "--resume", "auto") == 2
        err = error_line(capsys)
        assert f"is being written by another run (process {other.pid} on {socket.gethostname()}" in err
        assert "Wait for it to end" in err
        assert snapshot(run) == before
    finally:
        other.kill()
        other.wait()
    # the holder is gone (killed): the kernel released its lock, and the next run takes the folder
    assert train(data, run, "--epochs", "3", "--resume", "auto") == 0
    assert not (run / RunLock.OWNER).exists()


def test_a_lock_is_released_when_a_run_fails_and_a_stale_owner_note_is_no_lock(data, tmp_path, capsys):
    assert train(data, tmp_path / "run", "--epochs", "1", "--lr", "1e30") == 2  # diverges
    assert "nan" in error_line(capsys).lower()
    assert not (tmp_path / "run" / RunLock.OWNER).exists()
    lock = RunLock(tmp_path / "run")
    lock.acquire()  # free again
    lock.release()
    # a note naming this very process, left without the lock (a reused pid): nobody holds the folder
    (tmp_path / "run" / RunLock.OWNER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    with RunLock(tmp_path / "run"):
        assert json.loads((tmp_path / "run" / RunLock.OWNER).read_text())["pid"] == os.getpid()


def _contend(folder, go: int, result: int, done: int) -> None:
    """A forked contender: waits for the start signal, tries the lock, reports, and holds it until told."""
    os.read(go, 1)
    lock = RunLock(folder)
    try:
        lock.acquire()
        os.write(result, b"1")
    except ckpt_io.CheckpointError:
        os.write(result, b"0")
    os.read(done, 1)
    os._exit(0)


def test_two_processes_started_together_never_both_hold_a_dead_owners_lock(tmp_path):
    """A run killed outright leaves its lock and owner note; two runs started together after it: exactly one
    gets the folder, in every trial."""
    import signal

    winners = []
    for trial in range(200):
        folder = tmp_path / f"t{trial}"
        folder.mkdir()
        dead = subprocess.run([sys.executable, "-c", "import os, signal, sys; from metaformer.engine.run import "
                               "RunLock; lock = RunLock(sys.argv[1]); lock.acquire(); os.kill(os.getpid(), signal.SIGKILL)",
                               str(folder)], check=False) if trial == 0 else None
        if dead is not None:
            assert dead.returncode == -signal.SIGKILL and (folder / RunLock.OWNER).exists()
        else:  # the same leftovers, written directly (a process start per trial would take minutes)
            (folder / RunLock.NAME).write_text("")
            (folder / RunLock.OWNER).write_text(json.dumps({"pid": 2 ** 22 + trial, "host": socket.gethostname()}))
        go_r, go_w = os.pipe()
        res_r, res_w = os.pipe()
        done_r, done_w = os.pipe()
        pids = []
        for _ in range(2):
            pid = os.fork()
            if pid == 0:
                _contend(folder, go_r, res_w, done_r)
            pids.append(pid)
        os.write(go_w, b"gg")
        results = os.read(res_r, 1) + os.read(res_r, 1)
        os.write(done_w, b"dd")
        for pid in pids:
            os.waitpid(pid, 0)
        for fd in (go_r, go_w, res_r, res_w, done_r, done_w):
            os.close(fd)
        winners.append(results.count(b"1"))
    assert winners == [1] * 200, winners


def test_two_detection_runs_into_one_folder(tmp_path, capsys):
    toy = make_toy_data(tmp_path / "toy", num_train=2, num_val=1, size=64)
    argv = ["detect", "train", "--train-images", str(toy / "images/training"), "--train-ann",
            str(toy / "instances_training.json"), *DENSE, "--epochs", "1", "--output", str(tmp_path / "det")]
    assert main(argv) == 0
    with RunLock(tmp_path / "det"):  # this very process holds it, as another run would
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

@pytest.mark.parametrize("verb", ["export", "quantize", "cam", "data pack", "convert", "ablate", "bench",
                                  "detect predict"])
def test_an_unwritable_output_is_refused_before_the_work(data, finished, verb, capsys):
    """An output in a read-only place is one line from each verb, before any work (bench before benchmarking)."""
    ckpt, image = str(finished / "best.pth"), str(next((data / "val/0").iterdir()))
    argv = {"export": ["export", "--checkpoint", ckpt, "--output", "/sys/mf/m.onnx"],
            "quantize": ["quantize", ckpt, "--data", str(data), "--output", "/sys/mf/q.onnx"],
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
