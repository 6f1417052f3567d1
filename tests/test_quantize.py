"""Static int8: every family quantizes (ONNX Runtime), PT2E's program, the accuracy report of `metaformer quantize`
checked against `eval` of both models, the --max-drop refusal, and eval/predict/bench running the int8 file."""
import json
import tempfile
from pathlib import Path

import pytest
import torch

import metaformer
from metaformer.cli import main

pytest.importorskip("onnxruntime")
from metaformer.tools.exported import load_runtime  # noqa: E402
from metaformer.tools.quantize import onnx_ops, quantize_to_file  # noqa: E402

TINY = dict(depths=[1, 1, 1, 1], dims=[32, 32, 64, 64], img_size=64, num_classes=10)


def tiny(name, **kw):
    torch.manual_seed(0)
    return metaformer.create_model(name, **{**TINY, **kw}).eval()


def images(n, size=64, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["poolformer_s12", "poolformerv2_s12", "identityformer_s12", "randformer_s12",
                                  "convformer_s18", "caformer_s18", "metaformer_ppaa_s12"])
def test_every_family_quantizes_with_its_convs_and_matmuls_in_int8(tmp_path, name):
    model = tiny(name)
    path = quantize_to_file(model, images(8), tmp_path / "m.onnx")
    ops = onnx_ops(path)
    int8_convs = ops["int8"].get("Conv", 0)
    assert int8_convs >= 4 + 3, ops  # at least the stem, the downsamplings and the blocks' pointwise layers
    assert ops["int8"].get("Gemm", 0) + ops["int8"].get("MatMul", 0) >= 1  # the classifier
    assert not any(op in ops["int8"] for op in ("InstanceNormalization", "LayerNormalization", "Softmax"))
    x = images(4, seed=2)
    with torch.no_grad():
        ref = model(x)
    got = load_runtime(path)(x)
    assert (got - ref).norm() / ref.norm() < 0.15  # int8, not a different function
    assert (got - ref).abs().max() > 0  # and really quantized


def test_pt2e_program_quantizes_convs_and_tracks_the_fp32_model():
    pytest.importorskip("torchao")
    from metaformer.tools.quantize import program_ops, pt2e_program

    model = tiny("poolformer_s12")
    program = pt2e_program(model, images(8), 4)
    ops = program_ops(program)
    assert ops["int8"].get("conv2d", 0) >= 7 and ops["int8"].get("linear", 0) == 1, ops
    x = images(3, seed=2)
    with torch.no_grad():  # the program before Inductor lowers it: quantize/dequantize in fp32, same numbers
        got, ref = program.module()(x), model(x)
    assert 0 < (got - ref).abs().max() and (got - ref).norm() / ref.norm() < 0.15


@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory):
    """A small model trained for a few steps on the built-in digits, so the top-1 figures mean something."""
    from metaformer.data import Digits
    from metaformer.zoo import eval_transform
    from metaformer.tasks.inference import preprocessing_of

    torch.manual_seed(0)
    model = metaformer.create_model("poolformer_s12", depths=[1, 1, 1, 1], dims=[16, 32, 48, 64], img_size=32,
                                    num_classes=10)
    transform = eval_transform(**preprocessing_of(model))
    ds = Digits("train", 32, transform)
    x = torch.stack([ds[i][0] for i in range(512)])
    y = torch.tensor(ds.targets[:512])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(3):
        for i in range(0, 512, 64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[i:i + 64]), y[i:i + 64]).backward()
            opt.step()
    path = tmp_path_factory.mktemp("quant") / "digits.safetensors"
    metaformer.save_weights(model.eval(), path, class_names=[str(i) for i in range(10)])
    return path


def test_quantize_reports_what_eval_measures_and_eval_predict_bench_run_the_file(digits_ckpt, tmp_path, capsys):
    out = tmp_path / "digits_int8.onnx"
    assert main(["quantize", str(digits_ckpt), "--calib-images", "64", "--max-drop", "100", "-o", str(out),
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["written"] and out.is_file() and report["val_images"] == 360 and report["calib_images"] == 64
    assert abs(report["drop"] - (report["fp32_top1"] - report["int8_top1"])) < 1e-9
    assert 30 < report["fp32_top1"] and 0 < report["agreement"] <= 100
    # the same figures from eval: the checkpoint in PyTorch, the written file in ONNX Runtime
    assert main(["eval", "--checkpoint", str(digits_ckpt), "--no-fused", "--json", "--workers", "0"]) == 0
    assert abs(json.loads(capsys.readouterr().out)["top1"] - report["fp32_top1"]) < 1e-6
    assert main(["eval", "--exported", str(out), "--json", "--workers", "0"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert abs(evaluated["top1"] - report["int8_top1"]) < 1e-6 and "int8" in evaluated["speed"]
    meta = load_runtime(out).quantization  # the file carries its own measured cost
    assert meta["backend"] == "ort" and abs(meta["int8_top1"] - report["int8_top1"]) < 1e-9
    # predict and bench run it
    from PIL import Image

    Image.new("RGB", (32, 32), (255, 255, 255)).save(tmp_path / "x.png")
    assert main(["predict", "--exported", str(out), str(tmp_path / "x.png"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["predictions"][0][0] in [str(i) for i in range(10)]
    assert main(["bench", "--exported", str(out), "--modes", "eager,int8_ort", "--batch-size", "2", "--repeats",
                 "2", "--warmup", "1", "--json", "-o", str(tmp_path / "b.json")]) == 0
    rows = {r["mode"]: r for r in json.loads(capsys.readouterr().out)["results"]}
    assert set(rows) == {"eager", "int8_ort", "exported"} and rows["exported"]["images_per_s"] > 0
    assert rows["int8_ort"]["images_per_s"] > 0 and rows["int8_ort"]["max_abs_diff"] > 0


def test_quantize_refuses_a_drop_over_max_drop_unless_forced(digits_ckpt, tmp_path, capsys):
    out = tmp_path / "refused.onnx"
    # a negative budget: even an int8 model as good as fp32 exceeds it
    assert main(["quantize", str(digits_ckpt), "--calib-images", "32", "--max-drop", "-50", "-o", str(out)]) == 2
    captured = capsys.readouterr()
    assert not out.exists() and not list(tmp_path.glob(".refused*"))
    assert "refused" in captured.out and "fp32 top-1" in captured.out and "agreement" in captured.out
    assert "--max-drop -50" in captured.err and "--force" in captured.err
    assert main(["quantize", str(digits_ckpt), "--calib-images", "32", "--max-drop", "-50", "--force", "-o",
                 str(out)]) == 0
    assert out.is_file() and "wrote" in capsys.readouterr().out


def test_quantize_measures_the_file_it_wrote(digits_ckpt, tmp_path, monkeypatch):
    """The int8 column is the written file's own answer: a file whose runtime answers the opposite of the fp32
    model (its logits negated) agrees with it on no image."""
    from metaformer.data import Digits
    from metaformer.tasks.inference import load_for_inference
    from metaformer.tools import quantize as Q

    load = Q.load_runtime

    def negated(path):
        run = load(path)
        fn = run.fn
        run.fn = lambda x: -fn(x)
        return run

    monkeypatch.setattr(Q, "load_runtime", negated)
    loaded = load_for_inference(None, str(digits_ckpt))
    result = Q.quantize(loaded, Digits("train", 32, loaded.transform), Digits("val", 32, loaded.transform),
                        tmp_path / "neg.onnx", calib_images=16, force=True)
    assert result.written and result.accuracy.agreement == 0 and result.accuracy.int8_top1 < 20


def test_every_count_and_label_list_breaks_ties_by_class_index(tmp_path):
    """Scores that tie (int8 logits often do) rank the lower class index first in eval, quantize's comparison,
    predict and the ranking helper alike, so two counts of one file never disagree."""
    from metaformer.engine.metrics import ranked, top_hits
    from metaformer.tasks.inference import Loaded, evaluate, predict
    from metaformer.tools.quantize import compare

    tied = torch.zeros(6, 10)
    tied[:, 3] = tied[:, 7] = 1.0  # classes 3 and 7 tie on top; the other eight tie below them
    assert ranked(tied, 4).tolist() == [[3, 7, 0, 1]] * 6

    class Tied(torch.nn.Module):
        def forward(self, x):
            return tied[: len(x)].clone()

    y = torch.tensor([3, 7, 3, 0, 7, 3])
    loader = [(torch.zeros(6, 3, 8, 8), y, [])]
    assert {k: int(v) for k, v in top_hits(tied, y, (1, 2)).items()} == {1: 3, 2: 5}
    result = evaluate(Tied(), loader, torch.device("cpu"))
    assert result["top1"] == 50.0 and result["top5"] == 100.0
    acc = compare(Tied(), lambda x: tied[: len(x)].flip(0), loader)  # the same rows: identical answers
    assert acc.fp32_top1 == acc.int8_top1 == 50.0 and acc.agreement == 100.0
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    loaded = Loaded(Tied(), [str(i) for i in range(10)], 8, lambda im: torch.zeros(3, 8, 8), "tied")
    assert [name for name, _ in predict(loaded, [tmp_path / "x.png"], 3)[0]["predictions"]] == ["3", "7", "0"]


def test_quantize_output_names_a_folder_is_checked_first_and_is_replaced_only_when_asked(digits_ckpt, tmp_path,
                                                                                         capsys):
    folder = tmp_path / "out"
    args = ["quantize", str(digits_ckpt), "--calib-images", "8", "--max-drop", "100"]
    assert main([*args, "-o", f"{folder}/"]) == 0  # a new folder, named with a trailing slash: the default backend
    written = ["digits_int8.bin", "digits_int8.xml"]  # OpenVINO's IR and its weights
    assert sorted(p.name for p in folder.iterdir()) == written and not (tmp_path / "out.xml").exists()
    capsys.readouterr()
    # a killed run's temporary folder for the same file is removed by the next run
    stale = folder / ".digits_int8.xml.4194303.abcd1234.tmp"
    stale.mkdir()
    (stale / "digits_int8.xml").write_bytes(b"half a file")
    assert main([*args, "-o", str(folder)]) == 2  # an existing folder: the same file inside, which exists
    err = capsys.readouterr().err
    assert "digits_int8.xml already exists: pass --overwrite" in err and "Traceback" not in err
    before = (folder / "digits_int8.xml").stat().st_mtime_ns
    assert main([*args, "-o", str(folder), "--overwrite"]) == 0
    assert (folder / "digits_int8.xml").stat().st_mtime_ns != before
    assert sorted(p.name for p in folder.iterdir()) == written  # nothing hidden left behind
    capsys.readouterr()
    (tmp_path / "a_file").write_text("x")
    for bad, words in ((f"{tmp_path}/a_file/q.xml", "is a file, so the folder cannot be created"),
                       (f"{tmp_path}/{'q' * 300}.xml", "file systems allow at most 255 per name"),
                       (f"{tmp_path}/q.onnx --backend openvino", "names a .onnx file, which --backend ort writes")):
        assert main([*args, "-o", *bad.split()]) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_a_killed_runs_leftovers_are_removed_only_for_the_file_being_written(tmp_path):
    """check_output removes the temporary folders a killed run left for the same file (its name cut short in the
    temporary name when it is long), and leaves those of other files alone."""
    from metaformer.atomic import temp_prefix
    from metaformer.tools.quantize import check_output

    def leftover(name):  # what atomic_path leaves when its process (no such pid) was killed
        target = tmp_path / name
        return Path(tempfile.mkdtemp(dir=tmp_path, prefix=temp_prefix(target, "999999999.", ".tmp"), suffix=".tmp"))

    long = "q" * 250 + ".xml"
    mine, other, cut = leftover("q.xml"), leftover("other.xml"), leftover(long)
    assert not cut.name.startswith(f".{long}.")  # the long name is cut short in its temporary name
    check_output(tmp_path / "q.xml", None)
    assert not mine.exists() and other.exists() and cut.exists()
    check_output(tmp_path / long, None)
    assert not cut.exists() and other.exists()


def test_the_backend_follows_the_output_name():
    from metaformer.tools.quantize import DEFAULT_BACKEND, backend_for

    assert [backend_for(name, None) for name in ("a.onnx", "a.pt2", "a.xml", "a", None, "dir/")] == \
        ["ort", "pt2e", "openvino", DEFAULT_BACKEND, DEFAULT_BACKEND, DEFAULT_BACKEND]
    assert backend_for("a.onnx", "ort") == "ort" and backend_for("a", "pt2e") == "pt2e"


def test_a_pt2e_int8_file_loads_in_a_process_that_never_quantized(tmp_path):
    """Reading a PT2E program needs its quantize/dequantize operators registered: the loader does it, so eval,
    predict and serve open the file in a fresh process, where nothing else registered them."""
    import subprocess
    import sys

    model = tiny("poolformer_s12").eval()
    path = quantize_to_file(model, images(4), tmp_path / "tiny.pt2", "pt2e", {})
    code = ("import sys; from metaformer.tools.exported import load_runtime; r = load_runtime(sys.argv[1]); "
            "print(r.format, r.fixed_batch, r.input_shape)")
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.split() == ["exported", "None", "(3,", "64,", "64)"], done.stderr


def test_bench_onnx_runtime_modes_leave_no_scratch_files(tmp_path, monkeypatch):
    """ORT reads the graph when the session opens: bench removes its export (a whole model per run) right after."""
    from metaformer.tools.bench import modes

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    model, x = tiny("poolformer_s12").eval(), images(2)
    with torch.no_grad():
        fp32, int8 = modes._ort_session(model, x), modes._int8("ort", model, x)
        torch.testing.assert_close(fp32(x), model(x), rtol=1e-4, atol=1e-4)
        assert int8(x).shape == (2, 10)
    assert not list(scratch.iterdir())
