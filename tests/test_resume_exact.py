"""Exact resume with DataLoader workers: a run stopped mid-epoch and resumed, with the same or another number of
workers, ends with the weights and losses of an uninterrupted run, for classification on folders and on shards,
detection and segmentation. On shards, where the workers decide which samples an epoch's batches hold, another
count mid-epoch is refused instead."""
import pytest
import torch

from digits import write_digits
from metaformer.cli import main
from metaformer.engine.checkpoint import load as load_checkpoint
from metaformer.engine.stop import GracefulStop, Interrupted
from metaformer.tasks.dense import run as dense_run
from metaformer.tasks.dense.data import make_toy_data
from metaformer.tasks.detection import DetectionConfig, train_detection
from metaformer.tasks.segmentation import SegmentationConfig, train_segmentation

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools.*", "ignore:.*padding")

# The paper's recipe (RandAugment, random erasing, Mixup/CutMix, drop path): every random stream in play.
RECIPE = ["--depths", "1", "1", "1", "1", "--dims", "8", "16", "24", "32", "--img-size", "32", "--batch-size", "8",
          "--epochs", "2", "--drop-path", "0.1", "--warmup-epochs", "1"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """24 training images (3 steps of 8 per epoch) as class folders, and the same packed as 6 shards."""
    root = tmp_path_factory.mktemp("data")
    folder = write_digits(root / "folder", classes=("0", "1", "2"), per_class=8)
    assert main(["data", "pack", str(folder), str(root / "shards"), "--shard-size", "4"]) == 0
    return {"folder": folder, "shards": root / "shards"}


def train(data, out, workers, *extra):
    return main(["train", "--data", str(data), *RECIPE, "--workers", str(workers), "--output", str(out), *extra])


def stop_at_step(monkeypatch, step):
    """Ctrl-C during optimizer step ``step`` of the run (the loop saves after it and stops)."""
    calls = {"n": 0}

    def requested(self):
        calls["n"] += 1
        return calls["n"] == step

    monkeypatch.setattr(GracefulStop, "requested", property(requested))


def assert_same_run(a, b):
    a, b = torch.load(a / "last.pth", weights_only=True), torch.load(b / "last.pth", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]
    assert [h["val_loss"] for h in a["history"]] == [h["val_loss"] for h in b["history"]]


@pytest.fixture(scope="module")
def reference(digits, tmp_path_factory):
    """The uninterrupted run on each kind of data, with 2 workers."""
    runs = {}
    for kind in ("folder", "shards"):
        runs[kind] = tmp_path_factory.mktemp(f"ref-{kind}")
        assert train(digits[kind], runs[kind], 2, "--overwrite") == 0
    return runs


@pytest.mark.parametrize("kind,workers", [("folder", 2), ("folder", 0), ("shards", 2)])
def test_a_run_resumed_mid_epoch_with_workers_repeats_the_uninterrupted_one(digits, reference, kind, workers,
                                                                            tmp_path, monkeypatch):
    """A run stopped mid-epoch and resumed repeats the uninterrupted one: each sample's augmentation is seeded by the
    sample, not by a DataLoader worker's stream, so on folders even another number of workers gives the same
    crops and erasing (and the epoch's train_loss covers the whole epoch)."""
    stop_at_step(monkeypatch, 2)
    assert train(digits[kind], tmp_path, 2) == 130
    monkeypatch.undo()
    ckpt = torch.load(tmp_path / "last.pth", weights_only=True)
    assert (ckpt["epoch"], ckpt["step_in_epoch"]) == (0, 2)
    assert train(digits[kind], tmp_path, workers, "--resume", "auto") == 0
    assert_same_run(reference[kind], tmp_path)


def test_a_shard_run_stopped_mid_epoch_refuses_another_worker_count(digits, tmp_path, monkeypatch, capsys):
    """Shards are split among the readers, so a shard run stopped mid-epoch with 2 workers refuses to resume with
    another worker count (which would skip some samples that epoch and repeat others), says which to use, and leaves
    last.pth as it was; with 2 workers it resumes."""
    stop_at_step(monkeypatch, 2)
    assert train(digits["shards"], tmp_path / "b", 2) == 130
    monkeypatch.undo()
    before = (tmp_path / "b/last.pth").read_bytes()
    capsys.readouterr()
    assert train(digits["shards"], tmp_path / "b", 0, "--resume", "auto") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("metaformer train: error: --resume: ") and "read by 2 worker(s)" in err
    assert "resume with --workers 2" in err
    assert (tmp_path / "b/last.pth").read_bytes() == before
    assert train(digits["shards"], tmp_path / "b", 1, "--resume", "auto") == 2  # 1 worker reads like 0 workers
    assert train(digits["shards"], tmp_path / "b", 2, "--resume", "auto") == 0


def test_a_mid_epoch_resume_logs_the_whole_epochs_train_loss(digits, tmp_path, monkeypatch):
    """An epoch resumed mid-way logs the train_loss of the whole epoch, as the uninterrupted run does."""
    assert train(digits["folder"], tmp_path / "ref", 0, "--epochs", "1") == 0
    stop_at_step(monkeypatch, 1)
    assert train(digits["folder"], tmp_path / "b", 0, "--epochs", "1") == 130
    monkeypatch.undo()
    assert train(digits["folder"], tmp_path / "b", 0, "--epochs", "1", "--resume", "auto") == 0
    assert_same_run(tmp_path / "ref", tmp_path / "b")


# ----------------------------------------------------------------------------- detection, segmentation

TINY = dict(depths=[1, 1, 1, 1], dims=[8, 16, 24, 32])


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy_data(tmp_path_factory.mktemp("toy"), num_train=6, num_val=1, size=64, seed=1)


def stop_after_batches(monkeypatch, n):
    calls = {"n": 0}

    def stop(rt, s):
        calls["n"] += 1
        return calls["n"] == n

    monkeypatch.setattr(dense_run, "stop_requested", stop)


def assert_same_dense(task, a, b):
    a, b = load_checkpoint(a / "last.pth", task), load_checkpoint(b / "last.pth", task)
    assert a["iteration"] == b["iteration"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert [h.get("loss") for h in a["history"]] == [h.get("loss") for h in b["history"]]


def det_cfg(toy, out, workers, resume=None):
    return DetectionConfig(train_images=str(toy / "images/training"), train_ann=str(toy / "instances_training.json"),
                           output=str(out), arch="retinanet", backbone_overrides=TINY, fpn_channels=16, min_size=64,
                           max_size=64, epochs=2, lr_steps=[1], lr=1e-3, warmup_iters=2, batch_size=2,
                           workers=workers, resume=resume, log_every=1000)


def seg_cfg(toy, out, workers, resume=None):
    return SegmentationConfig(data_root=str(toy), val_split=None, output=str(out), num_classes=4,
                              backbone_overrides=TINY, fpn_channels=16, head_channels=16, img_scale=[64, 64],
                              crop_size=32, iters=5, batch_size=2, workers=workers, ckpt_every=100, resume=resume,
                              log_every=1000)


@pytest.mark.parametrize("task", ["detect", "segment"])
def test_a_dense_run_resumed_mid_pass_with_workers_repeats_the_uninterrupted_one(task, toy, tmp_path, monkeypatch):
    """A detection or segmentation run stopped mid-pass and resumed, with 2 workers and with 0, ends with the weights
    and losses of the uninterrupted run: the workers' flips and crops do not restart."""
    cfg, run = (det_cfg, train_detection) if task == "detect" else (seg_cfg, train_segmentation)
    run(cfg(toy, tmp_path / "ref", 2))
    for workers in (2, 0):
        out = tmp_path / f"w{workers}"
        stop_after_batches(monkeypatch, 4)  # the first batch of the second pass over the data (3 per pass)
        with pytest.raises(Interrupted):
            run(cfg(toy, out, 2))
        monkeypatch.undo()
        ckpt = load_checkpoint(out / "last.pth", task)
        assert (ckpt["epoch"], ckpt["step_in_epoch"]) == (1, 1)
        run(cfg(toy, out, workers, resume="auto"))
        assert_same_dense(task, tmp_path / "ref", out)
