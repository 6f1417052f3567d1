"""The ablation grid: its statistics against hand calculations, resume of a seeded grid, rows of one's own, the
submitit launcher (its local executor: real subprocesses, SLURM's code path), a diverging row."""
import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from metaformer.cli import main
from metaformer.tools import ablate_stats as S
from metaformer.tools.ablate import ROW_RESULT, parse_row, row_dir

# A tiny network on the built-in digits (1,437 images): each cell trains in seconds.
TINY = ["--data", "builtin:digits", "--set", "depths=[1,1,1,1]", "--set", "dims=[8,8,16,16]", "--set", "img_size=32",
        "--set", "batch_size=128", "--set", "aa=null"]
T975_1 = 12.706204736174707  # Student's t, 97.5% quantile, 1 degree of freedom (two seeds): from a t table
T975_2 = 4.302652729911275  # 2 degrees of freedom


def grid(tmp_path, *extra):
    return main(["ablate", "--rows", "baseline,identity", "--output", str(tmp_path), *TINY, *extra])


def result(tmp_path, row, k):
    return json.loads((row_dir(tmp_path, row, k) / ROW_RESULT).read_text())


def test_two_row_two_seed_micro_grid_intervals_match_a_hand_calculation(tmp_path, capsys):
    assert grid(tmp_path, "--seeds", "2", "--set", "epochs=1") == 0
    out = capsys.readouterr().out
    b = [result(tmp_path, "baseline", k)["final_top1"] for k in (0, 1)]
    i = [result(tmp_path, "identity", k)["final_top1"] for k in (0, 1)]
    rows = {r["row"]: r for r in csv.DictReader(open(tmp_path / "report.csv"))}
    # by hand: mean +- t * sd / sqrt(2), sd of two values = |a - b| / sqrt(2)
    for name, v in (("baseline", b), ("identity", i)):
        mean, half = (v[0] + v[1]) / 2, T975_1 * abs(v[0] - v[1]) / math.sqrt(2) / math.sqrt(2)
        r = rows[name]
        assert float(r["top1_mean"]) == pytest.approx(mean)
        assert float(r["top1_lo"]) == pytest.approx(mean - half) and float(r["top1_hi"]) == pytest.approx(mean + half)
    d = [i[0] - b[0], i[1] - b[1]]  # paired on the seed index
    mean, half = (d[0] + d[1]) / 2, T975_1 * abs(d[0] - d[1]) / 2
    r = rows["identity"]
    assert float(r["diff_mean"]) == pytest.approx(mean) and int(r["diff_seeds"]) == 2
    assert float(r["diff_lo"]) == pytest.approx(mean - half) and float(r["diff_hi"]) == pytest.approx(mean + half)
    resolved = mean - half > 0 or mean + half < 0
    assert r["verdict"] == ("not resolved" if not resolved else "resolved below" if mean < 0 else "resolved above")
    assert rows["baseline"]["verdict"] == "reference" and rows["baseline"]["diff_mean"] == ""
    md = (tmp_path / "report.md").read_text()
    assert f"| {mean:+.2f} [{mean - half:+.2f}, {mean + half:+.2f}] |" in md
    assert "74.3" in md and "77.2" in md and "-2.9" in md  # the paper's figures and difference beside ours
    assert "Does the token mixer matter" in md and "## What this grid resolves" in md
    assert (tmp_path / "report.png").stat().st_size > 1000
    g = json.loads((tmp_path / "grid.json").read_text())
    assert g["rows"] == ["baseline", "identity"] and g["seeds"] == 2 and g["flags"]["epochs"] == 1
    assert result(tmp_path, "identity", 1)["seed"] == result(tmp_path, "identity", 0)["seed"] + 1
    assert "4 of 4 cells finished" in out


def test_statistics_against_hand_calculations():
    iv = S.mean_interval([70.0, 72.0, 74.0])  # mean 72, sd 2, half-width t(2) * 2 / sqrt(3)
    assert iv.mean == pytest.approx(72) and iv.sd == pytest.approx(2)
    assert iv.half_width == pytest.approx(T975_2 * 2 / math.sqrt(3))
    one = S.mean_interval([70.0])
    assert one.mean == 70 and one.lo is None and S.verdict(one) == "n/a (1 paired seed)"
    diff = S.paired_difference({0: 71.0, 1: 73.0, 2: 75.0, 3: 99.0}, {0: 70.0, 1: 70.0, 2: 70.0})  # seed 3 unpaired
    assert diff.n == 3 and diff.mean == pytest.approx(3) and diff.sd == pytest.approx(2)
    assert diff.lo == pytest.approx(3 - T975_2 * 2 / math.sqrt(3))  # 3 - 4.97: the interval holds 0
    assert S.verdict(diff) == "not resolved"
    assert S.verdict(S.paired_difference({0: 74.0, 1: 75.0, 2: 76.0}, {0: 70.0, 1: 70.0, 2: 70.0})) == \
        "resolved above"


def test_paired_differences_resolve_what_unpaired_intervals_cannot():
    base = {0: 70.0, 1: 80.0, 2: 75.0}  # seeds differ a lot ...
    row = {k: v - 1.0 + 0.1 * k for k, v in base.items()}  # ... the row is about one point below on each
    assert S.mean_interval(list(row.values())).lo < S.mean_interval(list(base.values())).mean  # overlapping
    assert S.verdict(S.paired_difference(row, base)) == "resolved below"
    assert S.verdict(S.paired_difference(base, base)) == "not resolved"


def test_seeds_needed_and_pooled_sd():
    assert S.seeds_needed(1.0) == 4  # t(3) * 1 / 2 = 1.59 <= 2, t(2) * 1 / sqrt(3) = 2.48 > 2
    assert S.seeds_needed(100.0) is None
    pooled = S.pooled_sd([S.mean_interval([1.0, 3.0]), S.mean_interval([0.0, 2.0, 4.0])])  # (1 * 2 + 2 * 4) / 3
    assert pooled == pytest.approx(math.sqrt(10 / 3))


def test_spearman_and_its_bootstrap_interval():
    paper = [77.2, 74.3, 0.1, 78.1]
    runs = [[80.0, 81.0], [75.0, 74.0], [], [82.0, 85.0]]  # the third row never finished: ranked last
    means = [80.5, 74.5, -1.0, 83.5]
    assert S.spearman(means, paper) == pytest.approx(1.0)
    lo, hi = S.spearman_bootstrap(runs, paper)
    assert lo <= 1.0 <= hi and hi == pytest.approx(1.0)
    assert S.spearman_bootstrap(runs, paper) == (lo, hi)  # reproducible
    noisy = [[80.0, 70.0], [75.0, 79.0], [60.0, 61.0], [82.0, 72.0]]  # seeds that disagree on the order
    lo2, hi2 = S.spearman_bootstrap(noisy, paper)
    assert lo2 < 0.5 < hi2 == pytest.approx(1.0)
    assert S.spearman([1.0, 2.0], [1.0, 2.0]) is None and S.spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) is None


def test_resume_of_a_half_finished_seeded_grid(tmp_path, capsys):
    """A grid of 2 rows x 2 seeds stopped after seed 0, and with a cell whose training ended but whose result was
    never written: the same command trains only the missing cells, and finishes that one from its checkpoint."""
    assert grid(tmp_path, "--seeds", "1", "--set", "epochs=1") == 0
    before = {r: (row_dir(tmp_path, r, 0) / ROW_RESULT).read_text() for r in ("baseline", "identity")}
    (row_dir(tmp_path, "identity", 0) / ROW_RESULT).unlink()  # stopped between the last epoch and the result
    capsys.readouterr()
    assert grid(tmp_path, "--seeds", "2", "--set", "epochs=1") == 0
    out = capsys.readouterr().out
    assert (row_dir(tmp_path, "baseline", 0) / ROW_RESULT).read_text() == before["baseline"]  # not retrained
    again = result(tmp_path, "identity", 0)
    assert again["final_top1"] == json.loads(before["identity"])["final_top1"]
    assert "resumed from" not in out and "[1/3] identity seed 0" in out and "[3/3]" in out
    metrics = list(csv.DictReader(open(row_dir(tmp_path, "identity", 0) / "metrics.csv")))
    assert [int(m["epoch"]) for m in metrics] == [1]
    assert {(r["row"], int(r["seed_index"])) for r in map(json.loads, [
        (row_dir(tmp_path, n, k) / ROW_RESULT).read_text() for n in ("baseline", "identity") for k in (0, 1)])} == {
        ("baseline", 0), ("baseline", 1), ("identity", 0), ("identity", 1)}
    assert json.loads((tmp_path / "grid.json").read_text())["seeds"] == 2


def test_interrupted_grid_says_how_to_continue_and_the_same_command_resumes(tmp_path):
    """Ctrl-C in the middle of a row: exit 130 and the command to continue; running it again skips the
    finished row and resumes the interrupted one from its checkpoint."""
    cmd = [sys.executable, "-m", "metaformer", "ablate", "--rows", "baseline,identity", "--seeds", "1", "--output",
           str(tmp_path), *TINY, "--set", "epochs=2"]
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


def test_devices_run_cells_in_parallel_and_ctrl_c_stops_them_all(tmp_path):
    """--devices cpu,cpu: two worker processes share the cells; Ctrl-C from a terminal (SIGINT to the whole process
    group) makes each save its cell and the command exit 130; the same command then finishes the grid."""
    cmd = [sys.executable, "-m", "metaformer", "ablate", "--rows", "baseline,identity", "--seeds", "2", "--devices",
           "cpu,cpu", "--output", str(tmp_path), *TINY, "--set", "epochs=3"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    t0 = time.time()
    while len(list(tmp_path.glob("rows/*/seed*/last.pth"))) < 2:  # both workers are inside a cell
        assert p.poll() is None, p.communicate()
        assert time.time() - t0 < 300
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGINT)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 130, err
    assert "Continue with the same command" in err
    assert len(list(tmp_path.glob("rows/*/seed*/" + ROW_RESULT))) < 4
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "resumed from" in out.stdout + out.stderr and "4 of 4 cells finished" in out.stdout
    seeds = {json.loads(p.read_text())["seed_index"] for p in tmp_path.glob("rows/*/seed*/" + ROW_RESULT)}
    assert seeds == {0, 1}


def test_a_failing_cell_is_reported_with_its_log_and_the_grid_goes_on(tmp_path, capsys):
    """A row whose every cell raises (a bug in a mixer of one's own): each failure is listed with its log, the
    other cells finish, the report covers them, the exit code is 1; here over two --devices processes."""
    plugin = tmp_path / "mixers.py"
    plugin.write_text(PLUGIN)
    argv = ["ablate", "--plugin", str(plugin), "--row", "broken=broken_test", "--seeds", "2", "--devices", "cpu,cpu",
            "--output", str(tmp_path / "g"), *TINY, "--set", "epochs=1"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("this mixer is broken on purpose") == 2 and "cell broken/seed1 failed" in err
    log = row_dir(tmp_path / "g", "broken", 0) / "error.txt"
    assert f"log: {log}" in err and "Traceback" in log.read_text()
    assert [result(tmp_path / "g", "baseline", k)["status"] for k in (0, 1)] == ["ok", "ok"]
    assert "Not finished (2 cell(s), not in the table): broken/seed0, broken/seed1" in (
        tmp_path / "g" / "report.md").read_text()


PLUGIN = '''
import torch, metaformer

@metaformer.register_token_mixer("shift_test")
class Shift(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
    def forward(self, x):
        return torch.roll(x, 1, dims=-1) - x

@metaformer.register_token_mixer("broken_test")
class Broken(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
    def forward(self, x):
        raise RuntimeError("this mixer is broken on purpose")
'''


def test_rows_of_ones_own_from_the_command_line(tmp_path, capsys):
    plugin = tmp_path / "mixers.py"
    plugin.write_text(PLUGIN)
    out = tmp_path / "grid"
    assert main(["ablate", "--plugin", str(plugin), "--row", "shift=shift_test", "--row",
                 "p5_lr={pool_size: 5, lr: 0.002, epochs: 2}", "--seeds", "1", "--output", str(out), *TINY,
                 "--set", "epochs=1"]) == 0
    g = json.loads((out / "grid.json").read_text())
    assert g["rows"] == ["baseline", "shift", "p5_lr"]  # the reference comes with rows of one's own
    assert g["user_rows"]["p5_lr"] == "p5_lr={pool_size: 5, lr: 0.002, epochs: 2}"
    cfg = (row_dir(out, "p5_lr", 0) / "config.yaml").read_text()
    assert "pool_size: 5" in cfg and "lr: 0.002" in cfg and "epochs: 2" in cfg
    assert "token_mixers: shift_test" in (row_dir(out, "shift", 0) / "config.yaml").read_text()
    md = (out / "report.md").read_text()
    assert "| shift | user row: token_mixers \"shift_test\" |" in md
    capsys.readouterr()
    # the same row name with another definition would mix two experiments in one folder
    assert main(["ablate", "--plugin", str(plugin), "--row", "shift=dwconv", "--seeds", "1", "--output", str(out),
                 *TINY, "--set", "epochs=1"]) == 2
    assert "row shift: 'shift=shift_test' then, 'shift=dwconv' now" in capsys.readouterr().err


@pytest.mark.parametrize("text,message", [
    ("x", "NAME=MIXER or NAME="),
    ("identity=dwconv", "a row of the paper's table already"),
    ("a/b=dwconv", "names a folder"),
    ("r=nonesuch", "unknown token mixer 'nonesuch'"),
    ("r={warp: 1}", "'warp' is neither a `metaformer train` option nor a MetaFormer argument"),
    ("r={seed: 3}", "seed is the grid's"),
    ("r={data: builtin}", "data is the grid's"),
    ("r={lr: fast}", "lr must be a number"),
    ("r={model: poolformer_s13}", "not a variant"),
])
def test_a_bad_row_says_what_is_wrong(text, message):
    with pytest.raises(ValueError, match="--row") as e:
        parse_row(text)
    assert message in str(e.value)


def test_a_row_of_model_and_train_options_splits_them():
    row = parse_row("c={model: convformer_s18, norm: ln, drop_path: 0.1, mixup: 0}")
    assert row.variant == "convformer_s18" and row.model == {"norm": "ln"}
    assert row.train == {"drop_path": 0.1, "mixup": 0.0}
    assert parse_row("d=dwconv").model == {"token_mixers": "dwconv"}


def test_submitit_local_executor_runs_a_two_cell_grid_and_reports_a_failed_cell(tmp_path, capsys):
    """Each cell a job of submitit's local executor (a subprocess, as on SLURM); a job that fails is reported with
    its log, the report covers what finished, and a re-run resubmits only the failed cell."""
    pytest.importorskip("submitit")
    plugin = tmp_path / "mixers.py"
    plugin.write_text(PLUGIN)
    out = tmp_path / "grid"
    argv = ["ablate", "--launcher", "submitit", "--cluster", "local", "--local-parallelism", "2", "--plugin",
            str(plugin), "--rows", "baseline", "--row", "broken=broken_test", "--seeds", "1", "--output", str(out),
            *TINY, "--set", "epochs=1", "--submitit", "timeout_min=20"]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert result(out, "baseline", 0)["status"] == "ok"
    assert not (row_dir(out, "broken", 0) / ROW_RESULT).exists()
    assert "cell broken/seed0 failed" in captured.err and "this mixer is broken on purpose" in captured.err
    log = Path(captured.err.split("log: ")[1].split()[0])
    assert log.is_file() and "this mixer is broken on purpose" in log.read_text()
    md = (out / "report.md").read_text()
    assert "Not finished (1 cell(s), not in the table): broken/seed0" in md and "| baseline |" in md
    submitted = json.loads((out / "jobs" / "submitted.json").read_text())
    first = submitted["broken/seed0"]["job_id"]
    done = (row_dir(out, "baseline", 0) / ROW_RESULT).read_text()
    assert main(argv) == 1  # again: the finished cell is skipped, the failed one resubmitted
    captured = capsys.readouterr()
    assert (row_dir(out, "baseline", 0) / ROW_RESULT).read_text() == done
    assert "submitted 1 cell(s) to local" in captured.out
    assert json.loads((out / "jobs" / "submitted.json").read_text())["broken/seed0"]["job_id"] != first


def test_submitit_options_are_checked_before_anything_runs(tmp_path, capsys):
    pytest.importorskip("submitit")
    base = ["ablate", "--rows", "baseline", "--seeds", "1", "--output", str(tmp_path / "g"), *TINY]
    assert main([*base, "--launcher", "submitit", "--cluster", "local", "--submitit", "gpus=2"]) == 2
    assert "--submitit:" in capsys.readouterr().err
    assert main([*base, "--submitit", "timeout_min=5"]) == 2
    assert "go with --launcher submitit" in capsys.readouterr().err
    assert main([*base, "--launcher", "submitit", "--devices", "cpu,cpu"]) == 2
    assert "--devices is for --launcher local" in capsys.readouterr().err
    assert not (tmp_path / "g" / "rows").exists()


def test_a_grid_folder_refuses_another_budget_data_or_recipe(tmp_path, capsys):
    assert grid(tmp_path, "--rows", "baseline", "--seeds", "1", "--set", "epochs=1") == 0
    capsys.readouterr()
    # The reported bug: --budget paper with missing data exited 0 and printed the digits rows as "paper".
    assert main(["ablate", "--budget", "paper", "--data", str(tmp_path / "missing"), "--output", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    data = tmp_path / "data"
    for split in ("train", "val"):
        (data / split / "a").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(data / split / "a" / "x.png")
    argv = ["ablate", "--rows", "baseline", "--seeds", "1", "--output", str(tmp_path), *TINY, "--set", "epochs=1"]
    argv[argv.index("builtin:digits")] = str(data)
    assert main(argv) == 2
    assert "already holds a grid run with other settings (data: builtin:digits then" in capsys.readouterr().err
    assert grid(tmp_path, "--rows", "baseline", "--seeds", "1", "--set", "epochs=5") == 2
    assert "train options" in capsys.readouterr().err
    assert grid(tmp_path, "--seeds", "1", "--set", "epochs=1") == 0  # another row, same recipe: the grid grows


def test_a_diverging_row_is_recorded_and_the_grid_goes_on(tmp_path):
    assert grid(tmp_path, "--seeds", "1", "--set", "epochs=1", "--set", "lr=1e12", "--set", "smoothing=0") == 0
    results = [result(tmp_path, r, 0) for r in ("baseline", "identity")]
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
    assert main(["ablate", "--row", "r={norm: nonesuch}", "--output", str(tmp_path), *TINY]) == 2
    assert "row r:" in capsys.readouterr().err  # every row's network is built before the first one trains
    assert not (tmp_path / "rows").exists()


def test_help_and_readme_give_the_quick_grid_one_time(capsys):
    """`ablate --help` and the README give the quick grid the same time (QUICK_MINUTES)."""
    from metaformer.tools.ablate import QUICK_MINUTES

    with pytest.raises(SystemExit):
        main(["ablate", "--help"])
    assert f"about {QUICK_MINUTES} minutes for the whole grid" in " ".join(capsys.readouterr().out.split())
    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    assert f"with its seeds in about {QUICK_MINUTES} minutes on 2 CPU cores" in readme


def test_importing_submitit_leaves_the_process_logging_alone(monkeypatch):
    """The launcher imports submitit without its logging set-up, which would close every handler the process has
    (absl's closes sys.stderr with it)."""
    import io
    import logging

    from metaformer.tools.ablate_submitit import import_submitit

    pytest.importorskip("submitit")
    for key in [k for k in sys.modules if k == "submitit" or k.startswith("submitit.")]:
        monkeypatch.delitem(sys.modules, key)
    monkeypatch.delenv("SUBMITIT_LOG_LEVEL", raising=False)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.close = stream.close  # as absl's handler: closing it closes its stream
    logging.getLogger().addHandler(handler)
    try:
        import_submitit()
        assert handler in logging.getLogger().handlers and not stream.closed
    finally:
        logging.getLogger().removeHandler(handler)
