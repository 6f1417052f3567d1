"""Every verb with an extra missing: a one-line message naming the package and the extra that installs it, never a
traceback, and every verb that does not need the extra works without it.

CI installs every extra, so the ``hide`` fixture (tests/conftest.py) makes a package's import fail as if it were not
installed. Each extra is hidden in turn for every verb's ``--help`` and for the cheap invocation of each verb that
needs it (the message); each invocation also runs once with every extra it does not need hidden at once, and must
succeed (one run instead of one per extra: our code has no "this package, else that one" fallbacks, so a verb that
works without all of them works without each).
"""
import re
import shutil
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

import metaformer
from metaformer.cli import VERBS, main
from metaformer.errors import EXTRAS, MissingDependency, installed, need, require

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--depths", "1", "1", "1", "1", "--dims", "8", "8", "16", "16"]
DENSE = ["--override", "depths=[1,1,1,1]", "--override", "dims=[8,8,16,16]", "--fpn-channels", "16"]
TEST_ONLY = ("skimage",)  # installed for the tests (pyproject's test extra), never by metaformer's own extras
TIMM_SCRIPT = ("import sys, timm\nm = timm.create_model('metaformer_poolformer_s12', depths=[1, 1, 1, 1], "
               "dims=[8, 8, 16, 16])\nprint('built', type(m).__name__, sys.argv[1:])\n")


def test_the_table_of_extras_is_pyproject_toml():
    """EXTRAS names, for each extra, what pyproject.toml installs with it (scipy comes with scikit-learn)."""
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra, modules in EXTRAS.items():
        wanted = {d.split(">")[0].split("=")[0].split("[")[0] for d in declared[extra]}
        assert set(modules.values()) - {"scipy"} == wanted, extra
    assert set(declared) - {"all", "test"} == set(EXTRAS)


def test_a_missing_package_is_named_by_what_pip_installs(hide):
    hide("tensorboard", "sklearn")
    with pytest.raises(MissingDependency, match=r"^TensorBoard logging needs tensorboard, which is not installed: "
                                                r"pip install 'metaformer\[dense\]'$"):
        require("torch.utils.tensorboard", "dense", "TensorBoard logging")  # torch's module, tensorboard's package
    with pytest.raises(MissingDependency, match=r"needs scikit-learn, .* pip install 'metaformer\[train\]'$"):
        need("sklearn.datasets", "train", "the built-in digits")
    assert installed("torch") and not installed("sklearn")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """What the cheap invocations read, made with every extra installed: a tiny checkpoint of ours, an image, an
    ONNX export, an ImageFolder root and its shards, toy detection/segmentation data and checkpoints."""
    root = tmp_path_factory.mktemp("made")
    model = metaformer.create_model("poolformer_s12", depths=[1, 1, 1, 1], dims=[8, 8, 16, 16], num_classes=10,
                                    img_size=32)
    metaformer.save_weights(model, root / "tiny.safetensors", class_names=[str(i) for i in range(10)])
    shutil.copy(ROOT / "src/metaformer/tools/chelsea.jpg", root / "cat.jpg")
    (root / "script.py").write_text(TIMM_SCRIPT)
    commands = [
        ["export", "--checkpoint", f"{root}/tiny.safetensors", "-o", f"{root}/tiny.onnx"],
        ["data", "export-digits", f"{root}/digits"],
        ["data", "pack", f"{root}/digits", f"{root}/shards", "--shard-size", "500"],
        ["detect", "make-toy-data", f"{root}/toy", "--num-train", "2", "--num-val", "1", "--size", "64"],
        ["detect", "train", "--train-images", f"{root}/toy/images/training", "--train-ann",
         f"{root}/toy/instances_training.json", "--output", f"{root}/det", "--epochs", "1", "--min-size", "64",
         "--max-size", "64", "--batch-size", "2", "--workers", "0", "--warmup-iters", "0", *DENSE],
        ["segment", "train", "--data-root", f"{root}/toy", "--num-classes", "4", "--output", f"{root}/seg", "--iters",
         "1", "--img-scale", "64", "64", "--crop-size", "64", "--batch-size", "2", "--workers", "0",
         "--eval-every", "1", "--ckpt-every", "1", *DENSE],
    ]
    for argv in commands:
        assert main(argv) == 0, argv
    return root


def cases(made: Path, out: Path) -> dict[str, tuple[list[str], set[str]]]:
    """A cheap invocation of every verb: ``name: (argv, the extras it needs)``."""
    ck, img, toy = f"{made}/tiny.safetensors", f"{made}/cat.jpg", f"{made}/toy"
    det = ["--images", f"{toy}/images/validation", "--ann", f"{toy}/instances_validation.json"]
    return {
        "info": (["info", "poolformer_s12"], set()),
        "train": (["train", "--epochs", "1", "--output", f"{out}/train", *TINY], {"train"}),
        "train wandb": (["train", "--epochs", "1", "--output", f"{out}/train-wandb", "--wandb", "proj", *TINY],
                        {"train", "wandb"}),
        "train folder": (["train", "--data", f"{made}/digits", "--epochs", "1", "--img-size", "32", "--batch-size",
                          "256", "--workers", "0", "--output", f"{out}/train-folder", *TINY], {"train"}),
        "train shards": (["train", "--data", f"{made}/shards", "--epochs", "1", "--img-size", "32", "--batch-size",
                          "256", "--workers", "0", "--output", f"{out}/train-shards", *TINY], {"train", "data"}),
        "eval": (["eval", "--checkpoint", ck], {"train"}),  # on the built-in digits
        "eval folder": (["eval", "--checkpoint", ck, "--data", f"{made}/digits"], set()),
        "predict": (["predict", "--checkpoint", ck, img], set()),
        "predict onnx": (["predict", img, "--exported", f"{made}/tiny.onnx"], {"export"}),
        "export torchscript": (["export", "--checkpoint", ck, "--format", "torchscript", "-o", f"{out}/m.pt"], set()),
        "export exported": (["export", "--checkpoint", ck, "--format", "exported", "--fused", "-o", f"{out}/m.pt2"],
                            set()),
        "export onnx": (["export", "--checkpoint", ck, "-o", f"{out}/m.onnx"], {"export"}),
        "export openvino": (["export", "--checkpoint", ck, "--format", "openvino", "-o", f"{out}/m.xml"],
                            {"openvino"}),
        "cam": (["cam", img, "--checkpoint", ck, "--output", f"{out}/cam"], {"cam"}),
        "quantize": (["quantize", ck, "--data", f"{made}/digits", "--calib-images", "8", "--force", "-o",
                      f"{out}/q.onnx"], {"quant"}),
        "quantize pt2e": (["quantize", ck, "--data", f"{made}/digits", "--calib-images", "8", "--force", "--backend",
                           "pt2e", "-o", f"{out}/q.pt2"], {"quant"}),
        "quantize openvino": (["quantize", ck, "--data", f"{made}/digits", "--calib-images", "8", "--force",
                               "--backend", "openvino", "-o", f"{out}/q.xml"], {"openvino"}),
        "serve": (["serve", ck, "--no-cam"], {"serve"}),
        "serve onnx": (["serve", f"{made}/tiny.onnx"], {"serve", "export"}),
        "convert timm": (["convert", ck, f"{out}/timm.pth", "--to", "timm"], set()),
        "convert hf": (["convert", ck, f"{out}/hf", "--to", "hf"], set()),  # checked in transformers when it is there
        "bench": (["bench", "--batch-size", "1", "--img-size", "32", "--modes", "eager", "--repeats", "1", "--warmup",
                   "0", "-o", f"{out}/bench.json"], set()),
        "bench ort": (["bench", "--batch-size", "1", "--img-size", "32", "--modes", "eager,ort", "--repeats", "1",
                       "--warmup", "0", "-o", f"{out}/bench-ort.json"], {"export"}),
        "bench openvino": (["bench", "--batch-size", "1", "--img-size", "32", "--modes", "eager,ov_fp32,ov_int8",
                            "--repeats", "1", "--warmup", "0", "-o", f"{out}/bench-ov.json"], {"openvino"}),
        "ablate": (["ablate", "--rows", "baseline", "--set", "epochs=1", "--set", "depths=[1,1,1,1]", "--set",
                    "dims=[8,8,16,16]", "--output", f"{out}/ablate"], {"train"}),
        "ablate submitit": (["ablate", "--launcher", "submitit", "--cluster", "local", "--rows", "baseline", "--seeds",
                             "1", "--set", "epochs=1", "--set", "depths=[1,1,1,1]", "--set", "dims=[8,8,16,16]",
                             "--data", "builtin:digits", "--output", f"{out}/ablate-submitit"], {"train", "cluster"}),
        "data export-digits": (["data", "export-digits", f"{out}/digits"], {"train"}),
        "data pack": (["data", "pack", f"{made}/digits", f"{out}/shards"], {"data"}),
        "data check": (["data", "check", f"{made}/digits"], set()),
        "data check shards": (["data", "check", f"{made}/shards"], {"data"}),
        "timm": (["timm", f"{made}/script.py", "--flag"], set()),
        "detect make-toy-data": (["detect", "make-toy-data", f"{out}/toy", "--num-train", "1", "--num-val", "1",
                                  "--size", "64"], set()),
        "detect train": (["detect", "train", "--train-images", f"{toy}/images/training", "--train-ann",
                          f"{toy}/instances_training.json", "--output", f"{out}/det", "--epochs", "1", "--min-size",
                          "64", "--max-size", "64", "--batch-size", "2", "--workers", "0", "--warmup-iters", "0",
                          *DENSE], {"dense"}),
        "detect eval": (["detect", "eval", "--checkpoint", f"{made}/det/last.pth", "--workers", "0", *det], {"dense"}),
        "detect predict": (["detect", "predict", f"{toy}/images/validation", "--checkpoint", f"{made}/det/last.pth",
                            "--output", f"{out}/det-pred"], set()),
        "segment train": (["segment", "train", "--data-root", toy, "--num-classes", "4", "--output", f"{out}/seg",
                           "--iters", "1", "--img-scale", "64", "64", "--crop-size", "64", "--batch-size", "2",
                           "--workers", "0", "--eval-every", "1", "--ckpt-every", "1", *DENSE], {"dense"}),
        "segment eval": (["segment", "eval", "--checkpoint", f"{made}/seg/last.pth", "--data-root", toy], set()),
        "segment predict": (["segment", "predict", f"{toy}/images/validation", "--checkpoint",
                             f"{made}/seg/last.pth", "--output", f"{out}/seg-pred"], set()),
    }


CASE_NAMES = list(cases(Path("made"), Path("out")))


def test_every_verb_has_a_cheap_invocation():
    assert {argv[0] for argv, _ in cases(Path("made"), Path("out")).values()} == set(VERBS)


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_with(extras: set[str]) -> set[str]:
    """The modules of :data:`EXTRAS` that pip installs with ``extras`` (grad-cam brings matplotlib, scikit-learn
    and scipy; dense brings tensorboard as train does): they cannot be missing where those extras are."""
    todo, seen = [pip for extra in extras for pip in EXTRAS[extra].values()], set()
    while todo:
        dist = _canonical(todo.pop())
        if dist in seen:
            continue
        seen.add(dist)
        try:
            todo += [re.split(r"[<>=!~ ;\[(]", r, maxsplit=1)[0] for r in metadata.requires(dist) or []
                     if "extra ==" not in r]
        except metadata.PackageNotFoundError:
            pass
    return {module for modules in EXTRAS.values() for module, pip in modules.items() if _canonical(pip) in seen}


def one_line_naming(err: str, extra: str) -> None:
    """``err`` is one line: the missing-package message itself (not wrapped in another error), naming a package of
    ``extra`` and ending with the pip command that installs it."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    packages = "|".join(re.escape(p) for p in EXTRAS[extra].values())
    assert re.fullmatch(rf"metaformer [a-z -]+: error: [^()]+ needs ({packages}), which is not installed: "
                        rf"pip install 'metaformer\[{extra}\]'", lines[0]), err


@pytest.mark.parametrize("extra", list(EXTRAS))
def test_each_extra_hidden_every_help_works_and_each_verb_that_needs_it_says_so(extra, made, tmp_path, hide,
                                                                                 capsys, no_server):
    hide(*EXTRAS[extra])
    for argv in [["--help"], *([verb, "--help"] for verb in VERBS), ["detect", "train", "--help"],
                 ["segment", "train", "--help"], ["data", "pack", "--help"]]:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0, argv
    capsys.readouterr()
    for name, (argv, needs) in cases(made, tmp_path).items():
        if extra in needs:
            assert main(argv) == 2, name
            one_line_naming(capsys.readouterr().err, extra)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_each_verb_works_without_the_extras_it_does_not_need(name, made, tmp_path, hide, capsys, no_server):
    argv, needs = cases(made, tmp_path)[name]
    absent = [m for extra in needs for m in EXTRAS[extra] if not installed(m)]
    if absent:  # wandb is in no extra the tests install: its message is tested, a run with it is not
        pytest.skip(f"{', '.join(absent)} not installed here")
    kept = installed_with(needs)
    hide(*TEST_ONLY, *{m for modules in EXTRAS.values() for m in modules if m not in kept})
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 0 and "Traceback" not in err, (name, err)
    assert len(no_server) == (argv[0] == "serve"), name  # serve got as far as starting the server
    if name == "convert hf":  # written and checked in metaformer; the note says transformers' check did not run
        assert "note: checking the folder in transformers itself needs transformers, which is not installed" in out
