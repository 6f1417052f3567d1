"""`metaformer info`: the paper's parameter and MAC figures, from the command line."""
import json

from metaformer.cli import main


def test_info_table_lists_exact_params_and_paper_macs(capsys):
    assert main(["info", "poolformer_s12", "metaformer_ppaa_s12"]) == 0
    out = capsys.readouterr().out
    assert "| poolformer_s12 | 11,915,176 | 1.823 | 1.812 | 11.9M | 1.8 | 77.2 |" in out
    assert "| metaformer_ppaa_s12 | 16,535,592 | 2.549 |" in out  # channel LN left out, as the paper
    assert "eval resize 248 (bicubic, crop_pct 0.9)" in out  # the detail block of a named model


def test_info_json_includes_ablation_rows(capsys):
    assert main(["info", "poolformer_s12", "--ablation", "random", "no_mlp", "--json"]) == 0
    rows = {r["model"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["metaformer_s12_random"]["frozen"] > 21e6 and round(rows["metaformer_s12_random"]["gmacs"], 1) == 3.3
    assert rows["metaformer_s12_no_mlp"]["params"] == 2_451_368


def test_info_counts_live_at_another_size_and_stored_figures_are_exact(capsys):
    """The stored table is what a live count gives (the file cannot drift from the code)."""
    from metaformer.tools.complexity import measure
    from metaformer.zoo import list_models
    from metaformer.zoo.registry import complexity

    for name in list_models():
        assert complexity(name) == measure(name), name
    assert main(["info", "poolformer_s12", "--img-size", "256", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    assert row["gmacs"] > 1.823 * (256 / 224) ** 2 * 0.99


def test_info_unknown_model_is_one_clear_line(capsys):
    assert main(["info", "poolformer_s13"]) == 2
    assert "did you mean poolformer_s36, poolformer_s12" in capsys.readouterr().err


def test_info_of_one_model_lists_every_weight_tag_and_says_what_a_21k_head_is(capsys):
    assert main(["info", "convformer_s18"]) == 0
    out = capsys.readouterr().out
    tags = [line.split(":")[0].strip() for line in out.splitlines() if line.startswith("  convformer_s18.")]
    assert tags == [f"convformer_s18.{t}" for t in ("sail_in1k", "sail_in1k_384", "sail_in22k_ft_in1k",
                                                    "sail_in22k_ft_in1k_384", "sail_in22k")]
    assert "sail_in22k: imagenet-22k, 224px, 21841 classes, no ImageNet-1k top-1" in out and "top-1 None" not in out
