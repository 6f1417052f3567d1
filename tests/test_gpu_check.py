"""The prepared device script runs end to end on the CPU (``--dry-run``: tiny sizes, Triton interpreted),
and the pieces it relies on (the event timer, the traffic model) compute what they claim."""
import json
import os
import subprocess
import sys
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
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path), "--dry-run"],
                       capture_output=True, text=True, env=env, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert not [f for f in scratch.iterdir() if f.name.startswith("gpu-check-")]
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    errors = {k: v["error"] for k, v in res.items() if isinstance(v, dict) and "error" in v}
    assert not errors, errors
    # every section produced its figures: the fused paths ran and agree, training ran on both sides
    assert res["fuse"]["poolformer_s12/float32/triton"]["rel_vs_plain_same_dtype"] < 1e-5
    assert res["bench_infer"]["fused"]["images_per_s"] > 0 and res["bench_train"]["fast"]["images_per_s"] > 0
    assert all(row["rc"] == 0 for row in res["train_digits"].values())
    assert abs(res["train_digits"]["gpu bf16 fast"]["final_loss_minus_cpu"]) < 0.05
    assert all(row["rc"] == 0 for row in res["dense"].values())
    assert all(v.get("ok", True) and "error" not in v for v in res["export"].values())
    assert all(row["finite"] for row in res["families"].values())
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| infer: fused / timm_eager (bf16 b256) |" in md and "## kernels" in md


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
    # partial sums: mixer and fc2 each write (and the next kernel reads) one float32 pair per token and
    # 128-channel block: 1, 1, 3 and 4 blocks for 64, 128, 320 and 512 channels
    partial = sum(d * 2 * nb * hw * 8 * 2 for d, nb, hw in zip((2, 2, 6, 2), (1, 1, 3, 4), (3136, 784, 196, 49)))
    assert b["ours"] == 2 * sum(d * 13 * t + t for d, t in zip((2, 2, 6, 2), maps)) + partial
    p = traffic.predictions(224, 4.3e12)
    assert p["ours"]["images_per_s"] > 2.5 * p["plain"]["images_per_s"]
