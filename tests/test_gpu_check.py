"""The prepared device script runs end to end on the CPU (``--dry-run``: tiny sizes, Triton interpreted),
and the pieces it relies on (the event timer, the traffic model) compute what they claim."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from metaformer.tools import bench

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import traffic  # noqa: E402


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    pytest.importorskip("triton")
    scratch = tmp_path / "tmp"  # the sections' scratch folders (runs, exports) are gone when the check exits
    scratch.mkdir()
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT / "src"), "TMPDIR": str(scratch)}
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path), "--dry-run",
                        "--inductor-cache", str(tmp_path / "earlier.tar.gz")], capture_output=True, text=True,
                       env=env, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert not [f for f in scratch.iterdir() if f.name.startswith("gpu-check-")]
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    errors = {k: v["error"] for k, v in res.items() if isinstance(v, dict) and "error" in v}
    assert not errors, errors
    # every section produced its figures: the fused paths ran and agree, training ran on both sides
    assert res["fuse"]["poolformer_s12/float32/triton"]["rel_vs_plain_same_dtype"] < 1e-5
    assert res["fuse"]["poolformer_s12/bfloat16/triton-default-gemm"]["fused_over_plain_vs_fp32"] > 0
    assert res["bench_infer"]["fused"]["images_per_s"] > 0 and res["bench_train"]["fast"]["images_per_s"] > 0
    # the GEMM table was measured, written, and is what the benchmark's fused model ran
    table = json.loads((tmp_path / "gemm_table.json").read_text())
    assert len(table["entries"]) == 8 and set(res["gemm_tune"]["entries"]) == set(table["entries"])
    assert "[table]" in res["bench_infer"]["fused"]["note"]
    chosen = [k.split(" C=") for k, v in res["kernels"].items() if isinstance(v, dict) and v.get("chosen")]
    for size in ("16 16x16", "40 7x7"):  # at each stage shape: every kernel the fused model runs, one fc1, one fc2
        kinds = [kind for kind, at in chosen if at == size]
        assert {"gn1_stats", "pool_mix", "mixer backward sums", "mixer backward dx"} <= set(kinds)
        assert sum(k.startswith("fc1") for k in kinds) == 1 and sum(k.startswith("fc2") for k in kinds) == 1
    assert all(row["rc"] == 0 for row in res["train_digits"].values())
    assert abs(res["train_digits"]["gpu bf16 fast"]["final_loss_minus_cpu"]) < 0.05
    assert abs(res["train_digits"]["gpu fp16 fast"]["final_loss_minus_cpu"]) < 0.05  # with its GradScaler
    assert res["cache"]["read"]["read"] is None and (tmp_path / "inductor_cache.tar.gz").exists()
    for path in ("plain", "fast"):  # one-process DDP takes the very steps of the unwrapped model
        assert res["ddp"][path]["params_rel_diff"] == 0 and not res["ddp"][path]["warnings"]
    assert all(row["rc"] == 0 for row in res["dense"].values())
    assert all(v.get("ok", True) and "error" not in v for v in res["export"].values())
    assert all(row["finite"] for row in res["families"].values())
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| infer: fused / timm_eager (bf16 b256) |" in md and "## kernels" in md


def _gpu_check():
    import gpu_check

    return gpu_check


def test_budget_stops_a_running_section_and_skips_the_rest(tmp_path):
    """A section still running when --budget is spent is stopped even if it catches Exception, the rest are
    skipped, a section whose usual cost no longer fits is skipped, and each result is saved as it ends."""
    gc = _gpu_check()

    def stubborn(c):
        try:
            time.sleep(5)
        except Exception:  # noqa: BLE001 (a section's own handler must not swallow the budget)
            return {"swallowed": True}
        return {"slept": True}

    seen = []
    sections = {"a": lambda c: {"a": 1}, "b": stubborn, "c": lambda c: seen.append("c") or {"c": 1},
                "d": lambda c: {"d": 1}}
    c = gc.Check(True, tmp_path)
    t0 = time.time()
    gc.run_sections(c, ["a", "b", "c"], budget=0.5, sections=sections, cost={"a": 0, "b": 0, "c": 0})
    assert time.time() - t0 < 3 and not seen
    assert c.results["a"] == {"a": 1} and c.results["b"]["error"].startswith("stopped: the budget")
    assert c.results["c"]["error"] == "skipped: the budget ran out"
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["b"]["error"].startswith("stopped") and "Errors and skipped" in (tmp_path / "gpu_check.md").read_text()
    c = gc.Check(True, tmp_path)
    gc.run_sections(c, ["d", "a"], budget=30, sections=sections, cost={"d": 100, "a": 0})
    assert c.results["d"]["error"].startswith("skipped: 30s of the budget left") and c.results["a"] == {"a": 1}


def test_compile_caches_travel_in_one_archive(tmp_path, monkeypatch):
    """The caches' folder becomes one .tar.gz under the device tool's 16 MiB (without the compiled binaries if it
    must), and a later run starts from it with inductor and Triton pointed at the restored folder."""
    gc = _gpu_check()
    src = tmp_path / "cache"
    (src / "fxgraph" / "ab").mkdir(parents=True)
    (src / "fxgraph" / "ab" / "entry").write_text("graph")
    (src / "triton" / "k").mkdir(parents=True)
    (src / "triton" / "k" / "kernel.cubin").write_bytes(os.urandom(300_000))
    full = gc.save_cache(src, tmp_path / "out" / "a.tar.gz")
    assert full["binaries"] and full["files"] == 2
    small = gc.save_cache(src, tmp_path / "out" / "b.tar.gz", limit=100_000)
    assert not small["binaries"] and small["files"] == 1 and small["bytes"] <= 100_000
    assert gc.save_cache(src, tmp_path / "out" / "c.tar.gz", limit=10)["written"] is None
    assert not list((tmp_path / "out").glob("*.part"))
    for var in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):  # restored after the test, whatever use_cache sets
        monkeypatch.setenv(var, str(tmp_path / "elsewhere"))
    c = gc.Check(True, tmp_path)
    read = gc.use_cache(c, tmp_path / "out" / "a.tar.gz")
    assert read["files"] == 2 and os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(c.cache)
    assert (c.cache / "fxgraph" / "ab" / "entry").read_text() == "graph"
    assert os.environ["TRITON_CACHE_DIR"] == str(c.cache / "triton") and (c.cache / "triton" / "k" / "kernel.cubin").exists()
    assert gc.use_cache(gc.Check(True, tmp_path), tmp_path / "missing.tar.gz")["read"] is None


class _FakeEvent:
    """Stands in for torch.cuda.Event: a host clock read at record()."""
    clock = [0.0]

    def record(self):
        self.t = self.clock[0]

    def synchronize(self):
        pass

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3


def test_event_timer_reads_the_events():
    timer = bench.EventTimer(torch.device("cpu"), event=_FakeEvent)
    timer.start()
    _FakeEvent.clock[0] += 0.25
    assert timer.stop() == pytest.approx(0.25)
    fns = {"a": lambda x: _FakeEvent.clock.__setitem__(0, _FakeEvent.clock[0] + 0.01),
           "b": lambda x: _FakeEvent.clock.__setitem__(0, _FakeEvent.clock[0] + 0.03)}
    times = bench.interleaved_timing(fns, None, "cpu", repeats=3, warmup=1, timer=timer)
    assert times["a"] == pytest.approx([0.01] * 3) and times["b"] == pytest.approx([0.03] * 3)
    assert isinstance(bench.make_timer(torch.device("cpu")), bench.Timer)


def test_traffic_model_counts():
    """Per block 39 maps for the plain path, 13 for ours; S12 at 224 by hand: stage maps of 56*56*64 ..."""
    assert sum(traffic.PLAIN_BLOCK.values()) == 39 and sum(traffic.OURS_BLOCK.values()) == 13
    b = traffic.per_image_bytes(224)
    maps = [56 * 56 * 64, 28 * 28 * 128, 14 * 14 * 320, 7 * 7 * 512]
    assert b["plain"] == 2 * 39 * sum(d * t for d, t in zip((2, 2, 6, 2), maps))
    # partial sums: fc2 writes (and the next kernel reads) one float32 pair per token and 128-channel block:
    # 1, 1, 3 and 4 blocks for 64, 128, 320 and 512 channels (the mixer's, one pair per program, are left out)
    partial = sum(d * nb * hw * 8 * 2 for d, nb, hw in zip((2, 2, 6, 2), (1, 1, 3, 4), (3136, 784, 196, 49)))
    assert b["ours"] == 2 * sum(d * 13 * t + t for d, t in zip((2, 2, 6, 2), maps)) + partial
    p = traffic.predictions(224, 4.3e12)
    assert p["ours"]["images_per_s"] > 2.5 * p["plain"]["images_per_s"]
