"""The command line as one tool: --version, one flag vocabulary, every default shown once, unknown flags answered
with the verb's own usage, --json on stdout alone, bench printing each configuration as it finishes."""
import argparse
import json
import re

import pytest

import metaformer
from metaformer.cli import build_parser, main
from metaformer.cli.common import Formatter


def leaf_parsers(parser, path=()):
    """``(command path, parser)`` of every verb that runs something."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield " ".join(path), parser
    for action in subs:
        for name, sub in action.choices.items():
            yield from leaf_parsers(sub, (*path, name))


LEAVES = dict(leaf_parsers(build_parser()))


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"metaformer {metaformer.__version__} (torch ") and "timm" in out


@pytest.mark.parametrize("verb", sorted(LEAVES))
def test_every_default_is_shown_once_and_never_as_none(verb):
    parser = LEAVES[verb]
    formatter = Formatter(parser.prog)
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        text = formatter._get_help_string(action) % {**vars(action), "prog": parser.prog}
        assert text.count("default") <= 1, (verb, action.option_strings, text)
        assert "(default: None)" not in text and "(default: False)" not in text, (verb, action.option_strings)
        if action.default is not None and action.default is not False and action.default != argparse.SUPPRESS:
            assert "default" in text, (verb, action.option_strings, "a default the help does not show")
    assert "(default: None)" not in parser.format_help()


# One spelling per meaning across verbs.
VOCABULARY = {"output": "--output", "checkpoint": "--checkpoint", "device": "--device", "batch_size": "--batch-size",
              "workers": "--workers", "amp": "--amp", "json": "--json"}
FORBIDDEN = {"--out", "--batch", "--bs", "--ckpt", "--weights", "--num-workers", "--gpu", "--save-dir", "--outdir"}


@pytest.mark.parametrize("verb", sorted(LEAVES))
def test_one_flag_vocabulary(verb):
    for action in LEAVES[verb]._actions:
        assert not FORBIDDEN & set(action.option_strings), (verb, action.option_strings)
        if action.dest in VOCABULARY and action.option_strings:
            assert VOCABULARY[action.dest] in action.option_strings, (verb, action.option_strings)
        if action.dest == "amp" and action.choices:
            assert set(action.choices) == {"auto", "none", "bf16", "fp16"}, verb


@pytest.mark.parametrize("argv", [["eval", "--bogus"], ["detect", "train", "--train-images", "x", "--train-ann", "y",
                                                        "--bogus", "1"], ["data", "pack", "a", "b", "--bogus"]])
def test_unknown_flags_are_answered_with_the_verbs_usage(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    verb = " ".join(a for a in argv[:2] if not a.startswith("-") and a in ("eval", "detect", "train", "data", "pack"))
    assert err.startswith(f"usage: metaformer {verb}"), err
    assert re.search(r"unrecognized arguments: --bogus", err)


def test_train_json_leaves_stdout_to_the_summary(tmp_path, capsys):
    assert main(["train", "--epochs", "1", "--output", str(tmp_path / "run"), "--depths", "1", "1", "1", "1",
                 "--dims", "8", "16", "24", "32", "--json"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)  # the log lines went to stderr
    assert summary["epochs"] == 1 and summary["best_top1"] > 0 and "epoch 1/1" in captured.err


def test_bench_prints_each_configuration_as_it_finishes(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--batch-size", "1,2", "--img-size", "32", "--modes", "eager,fused", "--repeats", "1",
                 "--warmup", "0", "--output", str(out)]) == 0
    captured = capsys.readouterr()
    rows = [line for line in captured.out.splitlines() if line.startswith("| infer |")]
    assert len(rows) == 4
    assert re.search(r"\[1/2\] inference: poolformer_s12 batch 1 32x32 fp32 done; \d+s so far, about \d+s left",
                     captured.err)
    assert len(json.loads(out.read_text())["results"]) == 4


def test_bench_results_go_to_the_run_folder_and_it_says_where(tmp_path, monkeypatch, capsys):
    """bench without --output writes runs/bench/bench-DATE-TIME.json under the current folder and says where."""
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--batch-size", "1", "--img-size", "32", "--modes", "eager", "--repeats", "1",
                 "--warmup", "0"]) == 0
    written = list((tmp_path / "runs" / "bench").glob("bench-*.json"))
    assert len(written) == 1 and not (tmp_path / "benchmarks").exists()
    assert f"wrote {written[0].relative_to(tmp_path)}" in capsys.readouterr().err
