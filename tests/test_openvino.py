"""OpenVINO as a deploy backend: IR export verified against PyTorch, NNCF int8 with its measured cost, the files run
by every reader through the one loader, with their metadata and weights checked."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("openvino")

import metaformer  # noqa: E402
from metaformer.cli import main  # noqa: E402
from metaformer.tools.export import export  # noqa: E402
from metaformer.tools.exported import ExportError, load_runtime, openvino_core  # noqa: E402

TINY = dict(depths=[1, 1, 1, 1], dims=[16, 32, 48, 64], img_size=64, num_classes=10)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ov") / "tiny.safetensors"
    metaformer.save_weights(metaformer.create_model("poolformer_s12", **TINY).eval(), path,
                            class_names=[f"c{i}" for i in range(10)])
    return path


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
@pytest.mark.parametrize("name", ["poolformer_s12", "caformer_s18"])
def test_openvino_export_matches_pytorch_at_any_batch(tmp_path, name, fused):
    torch.manual_seed(0)
    kw = dict(TINY, depths=[1, 1, 1, 1]) if name == "poolformer_s12" else dict(num_classes=10, img_size=64,
                                                                                depths=[1, 1, 1, 1],
                                                                                dims=[16, 32, 64, 64])
    model = metaformer.create_model(name, **kw).eval()
    written = metaformer.fuse(model, backend="aten") if fused else model
    result = export(written, tmp_path / "m", "openvino")
    assert result.ok and result.path.suffix == ".xml" and result.path.with_suffix(".bin").is_file()
    run = load_runtime(result.path)
    assert run.format == "openvino" and run.fixed_batch is None
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        assert (run(x) - model(x)).abs().max() < 1e-4  # OpenVINO's bf16 default would miss this by far


def test_openvino_bf16_runs_in_bf16_and_is_checked_as_such(tmp_path):
    torch.manual_seed(0)
    model = metaformer.create_model("poolformer_s12", **TINY).eval()
    result = export(model, tmp_path / "bf16.xml", "openvino", dtype="bf16")
    assert 0 < result.max_diff_random <= 5e-2
    core = openvino_core()
    stored = json.loads(core.read_model(str(result.path)).get_rt_info(["metaformer"]).astype(str))
    assert stored["inference_precision"] == "bf16"  # what every reader compiles the file with
    if "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):  # elsewhere the plugin runs it in fp32
        assert result.max_diff_random > 1e-4  # the check ran it in bf16: fp32 differs by about 1e-7
    with pytest.raises(ExportError, match="fp32 or bf16"):
        export(model, tmp_path / "fp16.xml", "openvino", dtype="fp16")


def test_openvino_files_carry_their_metadata_and_refuse_changed_weights(ckpt, tmp_path, capsys):
    xml = tmp_path / "tiny.xml"
    assert main(["export", "--checkpoint", str(ckpt), "--format", "openvino", "-o", str(xml)]) == 0
    assert "wrote" in capsys.readouterr().out
    photo = tmp_path / "p.png"
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype("uint8")).save(photo)
    assert main(["predict", "--exported", str(xml), str(photo), "--json"]) == 0
    via_ov = json.loads(capsys.readouterr().out)[0]["predictions"]
    assert main(["predict", "--checkpoint", str(ckpt), str(photo), "--json", "--no-fused"]) == 0
    via_torch = json.loads(capsys.readouterr().out)[0]["predictions"]
    assert [n for n, _ in via_ov] == [n for n, _ in via_torch] and via_ov[0][0].startswith("c")
    assert main(["predict", "--checkpoint", str(ckpt), "--exported", str(xml), str(photo)]) == 0
    capsys.readouterr()
    # bytes flipped in the weights file: refused by every reader
    weights = bytearray(xml.with_suffix(".bin").read_bytes())
    weights[100:104] = bytes(b ^ 0xFF for b in weights[100:104])
    xml.with_suffix(".bin").write_bytes(bytes(weights))
    assert main(["predict", "--exported", str(xml), str(photo)]) == 2
    err = capsys.readouterr().err
    assert "the weights inside the file are not those it was written with" in err and "Traceback" not in err
    xml.with_suffix(".bin").unlink()
    assert main(["predict", "--exported", str(xml), str(photo)]) == 2
    assert "needs tiny.bin beside it" in capsys.readouterr().err


def test_openvino_int8_reports_what_eval_measures_and_refuses_over_max_drop(tmp_path, capsys):
    torch.manual_seed(0)
    ck = tmp_path / "digits.safetensors"
    model = metaformer.create_model("poolformer_s12", depths=[1, 1, 1, 1], dims=[16, 32, 48, 64], img_size=32,
                                    num_classes=10)
    metaformer.save_weights(model.eval(), ck, class_names=[str(i) for i in range(10)])
    out = tmp_path / "q.xml"
    assert main(["quantize", str(ck), "--backend", "openvino", "--calib-images", "16", "--max-drop", "100",
                 "-o", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["written"] and report["ops"]["int8"].get("Convolution", 0) >= 5
    assert main(["eval", "--exported", str(out), "--json", "--workers", "0"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert abs(evaluated["top1"] - report["int8_top1"]) < 1e-9 and "int8" in evaluated["speed"]
    assert load_runtime(out).quantization["backend"] == "openvino"
    refused = tmp_path / "refused.xml"
    assert main(["quantize", str(ck), "--backend", "openvino", "--calib-images", "16", "--max-drop", "-50",
                 "-o", str(refused)]) == 2
    assert not refused.exists() and not refused.with_suffix(".bin").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits.safetensors", "q.bin", "q.xml"]


def test_serve_runs_an_openvino_file(ckpt, tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from metaformer.tools.serve import create_app, load_servable

    xml = tmp_path / "tiny.xml"
    assert main(["export", "--checkpoint", str(ckpt), "--format", "openvino", "-o", str(xml)]) == 0
    import io

    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype("uint8")).save(buf, "PNG")
    with TestClient(create_app(load_servable(str(xml)))) as client:
        assert client.get("/info").json()["backend"] == "OpenVINO"
        body = client.post("/predict", files={"file": ("x.png", buf.getvalue(), "image/png")}).json()
        assert body["top1"].startswith("c") and len(body["predictions"]) == 5


def test_bench_times_openvino_beside_ours_and_our_fused_graph_in_openvino(tmp_path, capsys):
    modes = "fused,ov_fp32,ov_bf16,ov_int8,ov_fused_fp32,ov_fused_int8"
    assert main(["bench", "--img-size", "32", "--batch-size", "2", "--modes", modes, "--repeats", "1", "--warmup",
                 "0", "--no-memory", "--json", "-o", str(tmp_path / "b.json")]) == 0
    rows = {r["mode"]: r for r in json.loads(capsys.readouterr().out)["results"]}
    assert set(rows) == set(modes.split(",")) and all(r["images_per_s"] > 0 for r in rows.values())
    assert rows["ov_fp32"]["max_abs_diff"] < 1e-4 and rows["ov_fused_fp32"]["max_abs_diff"] < 1e-4
    assert 0 < rows["ov_bf16"]["max_abs_diff"] < 0.1 and 0 < rows["ov_int8"]["max_abs_diff"]
    if "BF16" in openvino_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):  # else the plugin runs fp32
        assert rows["ov_bf16"]["max_abs_diff"] > 1e-4  # compiled in bf16: fp32 differs by about 1e-6


SIGNAL_AFTER_TWO_FILES = """
import gc, os, signal, sys
from metaformer.tools.exported import load_runtime

first, second = load_runtime(sys.argv[1]), load_runtime(sys.argv[2])
del first  # released in the order they were loaded
gc.collect()
del second
gc.collect()
signal.signal(signal.SIGUSR1, lambda *_: print("handled"))
os.kill(os.getpid(), signal.SIGUSR1)  # delivered on this thread's alternate signal stack
"""


def test_a_signal_after_two_openvino_files_were_let_go_is_handled(tmp_path):
    """Files loaded one after another and released in the same order leave the process able to handle a signal
    (Ctrl-C, SIGTERM, a DataLoader's SIGCHLD); a Core per file left the thread a stack already unmapped."""
    import subprocess
    import sys

    torch.manual_seed(0)
    model = metaformer.create_model("poolformer_s12", **TINY).eval()
    paths = [export(model, tmp_path / f"m{i}", "openvino").path for i in range(2)]
    p = subprocess.run([sys.executable, "-c", SIGNAL_AFTER_TWO_FILES, *map(str, paths)], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0 and "handled" in p.stdout, (p.returncode, p.stderr[-2000:])
