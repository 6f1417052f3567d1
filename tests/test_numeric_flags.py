"""Every numeric flag of every verb at 0, a negative value, NaN and a huge value: a one-line error or a run that
works, never a traceback. The flags are read from the parsers themselves, so a new flag is covered as it is added
(and a verb that gains numeric flags must be given a base command here)."""
from pathlib import Path

import pytest

from digits import write_digits
from test_cli import leaf_parsers as leaves
from metaformer.cli import build_parser, main
from metaformer.ranges import Range

TINY_NET = ["--depths", "1", "1", "1", "1", "--dims", "8", "16", "24", "32", "--img-size", "32"]
DENSE_NET = ["--override", "depths=[1,1,1,1]", "--override", "dims=[8,16,24,32]", "--fpn-channels", "8"]


def item_type(action):
    """The type each value of a flag is parsed with (bench's comma-separated lists parse each item)."""
    return getattr(action.type, "item", action.type)


NUMERIC = {}  # verb -> its numeric flags
for verb, parser in leaves(build_parser()):
    flags = [a for a in parser._actions
             if a.option_strings and (item_type(a) in (int, float) or isinstance(item_type(a), Range))]
    if flags:
        NUMERIC[verb] = flags


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """What the verbs run on: a 2-class digits folder and a checkpoint trained on it, the toy shapes and a
    detection and a segmentation checkpoint trained on them."""
    from metaformer.tasks.dense.data import make_toy_data

    root = tmp_path_factory.mktemp("inputs")
    data = write_digits(root / "digits", classes=("0", "1"), per_class=4)
    assert main(["train", "--data", str(data), *TINY_NET, "--batch-size", "4", "--epochs", "1", "--workers", "0",
                 "--output", str(root / "run")]) == 0
    toy = make_toy_data(root / "toy", num_train=2, num_val=1, size=64)
    assert main(["detect", "train", "--train-images", str(toy / "images/training"), "--train-ann",
                 str(toy / "instances_training.json"), *DENSE_NET, "--min-size", "32", "--max-size", "64",
                 "--epochs", "1", "--batch-size", "2", "--workers", "0", "--output", str(root / "det")]) == 0
    assert main(["segment", "train", "--data-root", str(toy), "--num-classes", "4", *DENSE_NET, "--img-scale", "64",
                 "64", "--crop-size", "32", "--iters", "1", "--batch-size", "2", "--workers", "0", "--no-val",
                 "--output", str(root / "seg")]) == 0
    return {"data": data, "image": next((data / "val/0").iterdir()), "ckpt": root / "run/best.pth", "toy": toy,
            "det": root / "det/last.pth", "seg": root / "seg/last.pth"}


def base(verb: str, i: dict, out: Path) -> list[str]:
    """A command of ``verb`` that runs in a second or two; the flag under test is appended (the last one wins)."""
    toy, o = i["toy"], str(out / "out")
    det_data = ["--images", str(toy / "images/validation"), "--ann", str(toy / "instances_validation.json")]
    return {
        "info": ["info", "poolformer_s12"],
        "train": ["train", "--data", str(i["data"]), *TINY_NET, "--batch-size", "4", "--epochs", "1", "--workers",
                  "0", "--output", o],
        "eval": ["eval", "--checkpoint", str(i["ckpt"]), "--data", str(i["data"]), "--workers", "0"],
        "predict": ["predict", "--checkpoint", str(i["ckpt"]), str(i["image"])],
        "export": ["export", "--checkpoint", str(i["ckpt"]), "--output", o + ".onnx"],
        "cam": ["cam", "--checkpoint", str(i["ckpt"]), str(i["image"]), "--output", o],
        "bench": ["bench", "--batch-size", "1", "--img-size", "32", "--modes", "eager", "--repeats", "1", "--warmup",
                  "0", "--no-memory", "--output", o + ".json"],
        "ablate": ["ablate", "--rows", "baseline", "--set", "epochs=1", "--output", o],
        "data pack": ["data", "pack", str(i["data"]), o],
        "data export-digits": ["data", "export-digits", o],
        "quantize": ["quantize", str(i["ckpt"]), "--data", str(i["data"]), "--calib-images", "4", "--force",
                     "--output", o + ".onnx"],
        "serve": ["serve", str(i["ckpt"]), "--no-cam"],  # up to where uvicorn would start (the no_server fixture)
        "convert": ["convert", str(i["ckpt"]), o + ".safetensors", "--to", "ours"],
        "detect make-toy-data": ["detect", "make-toy-data", o, "--num-train", "1", "--num-val", "1", "--size", "32"],
        "segment make-toy-data": ["segment", "make-toy-data", o, "--num-train", "1", "--num-val", "1", "--size", "32"],
        "detect train": ["detect", "train", "--train-images", str(toy / "images/training"), "--train-ann",
                         str(toy / "instances_training.json"), *DENSE_NET, "--min-size", "32", "--max-size", "64",
                         "--epochs", "1", "--batch-size", "2", "--workers", "0", "--warmup-iters", "1",
                         "--output", o],
        "detect eval": ["detect", "eval", "--checkpoint", str(i["det"]), *det_data, "--workers", "0"],
        "detect predict": ["detect", "predict", str(toy / "images/validation"), "--checkpoint", str(i["det"]),
                           "--output", o],
        "segment train": ["segment", "train", "--data-root", str(toy), "--num-classes", "4", *DENSE_NET,
                          "--img-scale", "64", "64", "--crop-size", "32", "--iters", "1", "--batch-size", "2",
                          "--workers", "0", "--no-val", "--output", o],
        "segment eval": ["segment", "eval", "--checkpoint", str(i["seg"]), "--data-root", str(toy)],
        "segment predict": ["segment", "predict", str(toy / "images/validation"), "--checkpoint", str(i["seg"]),
                            "--output", o],
    }[verb]


# Every numeric flag and the values it accepts, written out: a bound loosened (or tightened) in the code fails
# test_every_numeric_flag_declares_its_range until it is changed here too, on purpose.
RANGES = {
    "ablate": {"--seeds": "1 to 100", "--local-parallelism": "1 to 1024"},
    "bench": {"--batch-size": "1 to 4096", "--img-size": "32 to 4096", "--train-batch": "1 to 4096",
        "--repeats": "1 to 10000", "--warmup": "0 to 1000"},
    "cam": {"--num-classes": "1 to 1000000"},
    "convert": {"--img-size": "32 to 4096"},
    "data export-digits": {"--img-size": "32 to 4096"},
    "data pack": {"--shard-size": ">= 1", "--seed": "0 to 9223372036854775807"},
    "detect eval": {"--workers": "0 to 1024"},
    "detect make-toy-data": {"--num-train": "1 to 100000", "--num-val": "1 to 100000", "--size": "32 to 4096",
        "--seed": "0 to 9223372036854775807"},
    "detect predict": {"--score-thresh": "0 to 1"},
    "detect train": {"--frozen-stages": "-1 to 16", "--fpn-channels": "1 to 4096", "--lr": "> 0",
        "--weight-decay": ">= 0", "--batch-size": "1 to 65536", "--workers": "0 to 1024",
        "--seed": "0 to 9223372036854775807", "--log-every": ">= 1", "--min-size": "32 to 4096",
        "--max-size": "32 to 4096", "--epochs": "1 to 100000", "--lr-steps": "1 to 100000",
        "--warmup-iters": "0 to 10000000"},
    "eval": {"--num-classes": "1 to 1000000", "--batch-size": "1 to 65536", "--workers": "0 to 1024"},
    "export": {"--num-classes": "1 to 1000000"},
    "info": {"--img-size": "32 to 4096"},
    "predict": {"--num-classes": "1 to 1000000", "--topk": ">= 1", "--batch-size": "1 to 65536"},
    "quantize": {"--calib-images": "1 to 1000000", "--max-drop": "-100 to 100", "--num-classes": "1 to 1000000",
        "--batch-size": "1 to 65536", "--workers": "0 to 1024"},
    "segment eval": {"--crop-size": "32 to 4096", "--img-scale": "32 to 4096"},
    "segment make-toy-data": {"--num-train": "1 to 100000", "--num-val": "1 to 100000", "--size": "32 to 4096",
        "--seed": "0 to 9223372036854775807"},
    "segment predict": {"--opacity": "0 to 1"},
    "segment train": {"--num-classes": "1 to 255", "--frozen-stages": "-1 to 16", "--fpn-channels": "1 to 4096",
        "--lr": "> 0", "--weight-decay": ">= 0", "--batch-size": "1 to 65536", "--workers": "0 to 1024",
        "--seed": "0 to 9223372036854775807", "--log-every": ">= 1", "--img-scale": "32 to 4096",
        "--crop-size": "32 to 4096", "--ratio-range": "> 0 and <= 16", "--iters": "1 to 10000000",
        "--power": "0 to 100", "--ckpt-every": ">= 1", "--eval-every": ">= 1"},
    "serve": {"--port": "1 to 65535", "--max-batch": "1 to 4096", "--max-wait-ms": "0 to 10000",
        "--max-queue": "1 to 1000000", "--max-mb": "> 0 and <= 4096", "--max-pixels": "1 to 178956970",
        "--max-decodes": "1 to 256", "--read-timeout": "> 0 and <= 3600"},
    "train": {"--depths": "1 to 100", "--dims": "1 to 8192", "--drop-path": ">= 0 and < 1",
        "--layer-decay": "> 0 and <= 1", "--frozen-stages": "-1 to 16", "--head-warmup-epochs": "0 to 100000",
        "--img-size": "32 to 4096", "--workers": "0 to 1024", "--epochs": "1 to 100000", "--batch-size": "1 to 65536",
        "--accum-steps": "1 to 65536", "--base-lr": "> 0", "--lr": "> 0", "--min-lr": ">= 0", "--warmup-lr": ">= 0",
        "--warmup-epochs": "0 to 100000", "--opt-eps": "> 0", "--opt-betas": ">= 0 and < 1", "--weight-decay": ">= 0",
        "--clip-grad": "> 0", "--smoothing": ">= 0 and < 1", "--mixup": ">= 0", "--cutmix": ">= 0",
        "--mixup-prob": "0 to 1", "--mixup-switch-prob": "0 to 1", "--color-jitter": ">= 0",
        "--scale": "> 0 and <= 1", "--ratio": "> 0", "--hflip": "0 to 1", "--reprob": "0 to 1", "--recount": "1 to 100",
        "--ema-decay": ">= 0 and < 1", "--seed": "0 to 9223372036854775807", "--log-interval": ">= 1"},
}


def test_every_numeric_flag_declares_its_range():
    """A flag parsed with plain int/float takes 0, -3, nan or 1e30 and fails somewhere inside (`bench --train-batch
    0` gave NaN in the JSON); a Range refuses them as they are parsed, shows them in --help, and is the one
    written out in RANGES (the sweep below runs whatever a range admits, so only this comparison notices a bound
    that was loosened)."""
    plain = [f"{verb} {'/'.join(a.option_strings)}" for verb, flags in NUMERIC.items() for a in flags
             if not isinstance(item_type(a), Range)]
    assert not plain, plain
    declared = {verb: {a.option_strings[0]: item_type(a).describe() for a in flags} for verb, flags in NUMERIC.items()}
    assert declared == RANGES
    for verb, parser in leaves(build_parser()):
        text = parser.format_help()
        for a in NUMERIC.get(verb, []):
            assert item_type(a).describe() in " ".join(text.split()), (verb, a.option_strings)


CASES = [(verb, a.option_strings[0], value) for verb, flags in sorted(NUMERIC.items()) for a in flags
         for value in ("0", "-1", "nan", "1000000000" if getattr(item_type(a), "integer", item_type(a) is int)
                       else "1e30")]


@pytest.mark.parametrize("verb,flag,value", CASES, ids=[f"{v}{f}={x}" for v, f, x in CASES])
def test_a_numeric_flag_gives_a_one_line_error_or_a_working_run(verb, flag, value, inputs, tmp_path, capsys,
                                                                 no_server):
    action = next(a for a in NUMERIC[verb] if flag in a.option_strings)
    times = action.nargs if isinstance(action.nargs, int) else 1
    argv = base(verb, inputs, tmp_path) + [flag, *[value] * times]
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse: usage, then one error line
        rc = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert rc in (0, 2), (rc, err)
    if rc == 2:
        errors = [line for line in err.replace("\r", "\n").splitlines() if "error:" in line]
        assert len(errors) == 1 and errors[0].startswith(f"metaformer {verb.split()[0]}"), err


def test_the_command_line_bounds_match_the_models():
    from metaformer.models.metaformer import MIN_INPUT
    from metaformer.ranges import MIN_IMG_SIZE

    assert MIN_IMG_SIZE == MIN_INPUT


@pytest.mark.parametrize("argv,expected", [
    (["train", "--clip-grad", "-1"], "argument --clip-grad: must be > 0, not -1"),  # loss climbed, 0% top-1
    (["train", "--clip-grad", "0"], "argument --clip-grad: must be > 0, not 0"),  # nothing learned
    (["train", "--ema-decay", "2"], "argument --ema-decay: must be >= 0 and < 1, not 2"),  # the EMA diverged
    (["bench", "--train-only", "--train-batch", "0"], "argument --train-batch: must be 1 to 4096, not 0"),  # NaN
    (["detect", "make-toy-data", "toy", "--num-train", "-1"], "argument --num-train: must be 1 to 100000, not -1"),
])
def test_values_that_would_run_to_a_wrong_result_are_refused(argv, expected, tmp_path, monkeypatch, capsys):
    """Values that would run to the end with a wrong result ("wrote -1 training images", 0 img/s and NaN in bench's
    JSON, an EMA that diverges) are refused as the flags are parsed: exit 2, the flag's error, nothing written."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert f"error: {expected}" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
