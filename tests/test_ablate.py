"""The ablation grid: a two-row micro grid, resume of a partly finished grid, a diverging row."""
import csv
import json

import pytest

from metaformer.ablate import ROW_RESULT, row_dir, spearman, summarise
from metaformer.cli import main

TINY = ["--set", "depths=[1,1,1,1]", "--set", "dims=[32,32,32,32]", "--set", "img_size=32",
        "--set", "batch_size=128", "--set", "aa=null"]


def grid(tmp_path, *extra):
    return main(["ablate", "--rows", "baseline,identity", "--output", str(tmp_path), *TINY, *extra])


def test_two_row_micro_grid_writes_the_report(tmp_path, capsys):
    assert grid(tmp_path, "--set", "epochs=1") == 0
    out = capsys.readouterr().out
    md = (tmp_path / "report.md").read_text()
    assert "| baseline | PoolFormer-S12" in md and "| identity | pooling -> identity" in md
    assert "74.3" in md and "77.2" in md  # the paper's figures beside ours
    assert "Spearman rank correlation" in md and "Command: `metaformer" in md
    rows = list(csv.DictReader(open(tmp_path / "report.csv")))
    assert [r["row"] for r in rows] == ["baseline", "identity"]
    for r in rows:
        assert 0 <= float(r["top1_mean"]) <= 100 and int(r["params"]) > 0 and float(r["gmacs"]) > 0
    assert (tmp_path / "report.png").stat().st_size > 1000
    grid_json = json.loads((tmp_path / "grid.json").read_text())
    assert grid_json["rows"] == ["baseline", "identity"] and grid_json["flags"]["epochs"] == 1
    assert "done in" in out


def test_restarted_grid_skips_finished_rows_and_resumes_the_running_one(tmp_path, capsys):
    assert grid(tmp_path, "--set", "epochs=1") == 0
    finished = row_dir(tmp_path, "baseline", 0) / ROW_RESULT
    before = finished.read_text()
    # The grid was killed while training `identity`: its epoch-1 checkpoint exists, its result does not.
    (row_dir(tmp_path, "identity", 0) / ROW_RESULT).unlink()
    capsys.readouterr()
    assert grid(tmp_path, "--set", "epochs=2") == 0
    log = capsys.readouterr()
    assert finished.read_text() == before  # not retrained
    assert "resumed from" in log.out + log.err and "rows/identity/seed0/last.pth" in log.out + log.err
    metrics = list(csv.DictReader(open(row_dir(tmp_path, "identity", 0) / "metrics.csv")))
    assert [int(m["epoch"]) for m in metrics] == [1, 2]  # epoch 1 from before, epoch 2 added


def test_a_diverging_row_is_recorded_and_the_grid_goes_on(tmp_path):
    assert grid(tmp_path, "--set", "epochs=1", "--set", "lr=1e12", "--set", "smoothing=0") == 0
    results = [json.loads((row_dir(tmp_path, r, 0) / ROW_RESULT).read_text()) for r in ("baseline", "identity")]
    assert [r["status"] for r in results] == ["diverged", "diverged"]
    assert "loss is" in results[0]["message"]
    assert "diverged" in (tmp_path / "report.md").read_text()


def test_bad_rows_and_budget_give_clear_errors(tmp_path, capsys):
    assert main(["ablate", "--rows", "baseline,warp", "--output", str(tmp_path)]) == 2
    assert "unknown row(s) warp" in capsys.readouterr().err
    assert main(["ablate", "--budget", "paper", "--output", str(tmp_path)]) == 2
    assert "--data" in capsys.readouterr().err
    assert main(["ablate", "--set", "epoch=3", "--output", str(tmp_path)]) == 2
    assert "unknown train option(s) epoch" in capsys.readouterr().err


def test_summary_mean_std_and_spearman():
    results = [
        {"row": "baseline", "status": "ok", "best_top1": 90.0, "images_per_s": 10},
        {"row": "baseline", "status": "ok", "best_top1": 92.0, "images_per_s": 10},
        {"row": "identity", "status": "ok", "best_top1": 80.0, "images_per_s": 10},
        {"row": "no_residual", "status": "diverged", "best_top1": None, "images_per_s": None},
    ]
    table = summarise(results)
    base = table[0]
    assert base["top1_mean"] == pytest.approx(91.0) and base["top1_std"] == pytest.approx(2 ** 0.5)
    assert table[2]["top1_mean"] is None and table[2]["diverged"] == 1
    rho, n = spearman(table)  # paper order 77.2 > 74.3 > 0.1 and measured 91 > 80 > diverged
    assert n == 3 and rho == pytest.approx(1.0)
