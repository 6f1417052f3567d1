"""The engine's metrics: CSV and JSONL rewritten from the history (a resumed run never repeats a row), TensorBoard
events, and Weights & Biases when asked for (a stand-in module here: the real one is optional)."""
import csv
import json
import sys
import types

import pytest

from metaformer.engine.metrics import MetricsLog
from metaformer.errors import MissingDependency


def tensorboard_scalars(folder) -> dict:
    """``{tag: [(step, value), ...]}`` as TensorBoard reads the event files back."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_rows_go_to_csv_jsonl_and_tensorboard(tmp_path):
    log = MetricsLog(tmp_path, True, [], "epoch")
    log.scalar("train/loss", 2.5, 7)
    log.add({"epoch": 1, "loss": 2.0, "top1": 10.0, "per_class": [0.1, 0.2], "note": "warm-up"})
    row = {"epoch": 2, "loss": 1.5}
    log.add(row)
    row["top1"] = 40.0  # an evaluation added to the row later
    log.update(row)
    log.close()
    # every numeric key of every row, in both files: CSV columns in first-seen order; JSONL keeps lists and text
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert rows == [{"epoch": "1", "loss": "2.0", "top1": "10.0"}, {"epoch": "2", "loss": "1.5", "top1": "40.0"}]
    assert [json.loads(line) for line in open(tmp_path / "metrics.jsonl")] == [
        {"epoch": 1, "loss": 2.0, "top1": 10.0, "per_class": [0.1, 0.2], "note": "warm-up"},
        {"epoch": 2, "loss": 1.5, "top1": 40.0}]
    # TensorBoard: each scalar under the step key's axis, the between-row point under its own name; the row
    # re-logged after its evaluation repeats its loss at the same step (TensorBoard keeps the last)
    assert tensorboard_scalars(tmp_path / "tb") == {
        "train/loss": [(7, 2.5)], "epoch/loss": [(1, 2.0), (2, 1.5), (2, 1.5)], "epoch/top1": [(1, 10.0), (2, 40.0)]}


def test_a_resumed_run_rewrites_the_files_from_its_history(tmp_path):
    log = MetricsLog(tmp_path, True, [], "epoch")
    for e in (1, 2, 3):
        log.add({"epoch": e, "loss": 1.0 / e})
    log.close()
    # resumed from the checkpoint of epoch 2: its history has two rows, the third is redone
    log = MetricsLog(tmp_path, True, [{"epoch": 1, "loss": 1.0}, {"epoch": 2, "loss": 0.5}], "epoch", purge_step=2)
    log.add({"epoch": 3, "loss": 0.3})
    log.close()
    assert [json.loads(line)["loss"] for line in open(tmp_path / "metrics.jsonl")] == [1.0, 0.5, 0.3]


def test_other_ranks_write_nothing(tmp_path):
    log = MetricsLog(tmp_path / "run", False, [], "epoch", wandb="project")
    log.add({"epoch": 1, "loss": 1.0})
    log.close()
    assert not (tmp_path / "run").exists()


def test_weights_and_biases_gets_every_row(tmp_path, monkeypatch):
    calls = []

    class Run:
        def log(self, values, step):
            calls.append(("log", values, step))

        def finish(self):
            calls.append(("finish",))

    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls.append(("init", kw)) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    log = MetricsLog(tmp_path / "run", True, [], "iteration", tensorboard=False, wandb="my-project",
                     config={"lr": 1e-3})
    log.scalar("train/loss", 0.7, 5)
    log.add({"iteration": 10, "loss": 0.5, "mIoU": 0.25})
    log.close()
    assert calls[0][0] == "init" and calls[0][1]["project"] == "my-project" and calls[0][1]["config"] == {"lr": 1e-3}
    assert [c[1:] for c in calls if c[0] == "log"] == [  # every key and value of every call, in order
        ({"train/loss": 0.7}, 5), ({"iteration/loss": 0.5}, 10), ({"iteration/mIoU": 0.25}, 10)]
    assert calls[-1] == ("finish",)


def test_wandb_missing_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import fails
    with pytest.raises(MissingDependency, match=r"pip install 'metaformer\[wandb\]'"):
        MetricsLog(tmp_path, True, [], "epoch", tensorboard=False, wandb="p")
