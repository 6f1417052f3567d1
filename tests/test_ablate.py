"""The ablation grid: a two-row micro grid, resume of a partly finished grid, a diverging row."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

from metaformer.tools.ablate import ROW_RESULT, row_dir, spearman, summarise
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


def test_interrupted_grid_says_how_to_continue_and_the_same_command_resumes(tmp_path):
    """Ctrl-C in the middle of a row: exit 130 and the command to continue; running it again skips the
    finished row and resumes the interrupted one from its checkpoint."""
    cmd = [sys.executable, "-m", "metaformer", "ablate", "--rows", "baseline,identity", "--output", str(tmp_path),
           *TINY, "--set", "epochs=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    running = row_dir(tmp_path, "identity", 0) / "last.pth"
    t0 = time.time()
    while not running.exists():  # identity has finished its first epoch
        assert p.poll() is None, p.communicate()
        assert time.time() - t0 < 300
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate()
    assert p.returncode == 130, err
    assert "Continue with the same command" in err and "metaformer ablate --rows baseline,identity" in err
    finished = row_dir(tmp_path, "baseline", 0) / ROW_RESULT
    before = finished.read_text()
    assert not (row_dir(tmp_path, "identity", 0) / ROW_RESULT).exists()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert finished.read_text() == before  # not retrained
    assert "resumed from" in out.stdout + out.stderr
    metrics = list(csv.DictReader(open(row_dir(tmp_path, "identity", 0) / "metrics.csv")))
    assert [int(m["epoch"]) for m in metrics] == [1, 2]


def test_a_grid_folder_refuses_another_budget_data_or_recipe(tmp_path, capsys):
    assert grid(tmp_path, "--rows", "baseline", "--set", "epochs=1") == 0
    capsys.readouterr()
    # The reported bug: --budget paper with missing data exited 0 and printed the digits rows as "paper".
    assert main(["ablate", "--budget", "paper", "--data", str(tmp_path / "missing"), "--output", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    data = tmp_path / "data"
    for split in ("train", "val"):
        (data / split / "a").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(data / split / "a" / "x.png")
    assert main(["ablate", "--rows", "baseline", "--data", str(data), "--output", str(tmp_path), *TINY,
                 "--set", "epochs=1"]) == 2
    assert "already holds a grid run with other settings (data: the built-in digits then" in capsys.readouterr().err
    assert grid(tmp_path, "--rows", "baseline", "--set", "epochs=5") == 2
    assert "train options" in capsys.readouterr().err
    assert grid(tmp_path, "--set", "epochs=1") == 0  # another row, same recipe: the grid grows


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
    assert "unknown train option 'epoch'" in capsys.readouterr().err


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


def test_help_and_readme_give_the_quick_grid_one_time(capsys):
    """`ablate --help` and the README give the quick grid the same time (QUICK_MINUTES)."""
    from pathlib import Path

    from metaformer.tools.ablate import QUICK_MINUTES

    with pytest.raises(SystemExit):
        main(["ablate", "--help"])
    assert f"about {QUICK_MINUTES} minutes for the whole grid" in " ".join(capsys.readouterr().out.split())
    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    assert f"24-row grid in about {QUICK_MINUTES} minutes on 2 CPU cores" in readme
