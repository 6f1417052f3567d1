"""`metaformer info`: the paper's parameter and MAC figures, from the command line."""
import json

from metaformer.cli import main


def test_info_table_lists_exact_params_and_paper_macs(capsys):
    assert main(["info", "poolformer_s12", "metaformer_ppaa_s12"]) == 0
    out = capsys.readouterr().out
    assert "| poolformer_s12 | 11,915,176 | 1.823 (1.8) |" in out
    assert "| metaformer_ppaa_s12 | 16,535,592 | 2.549 (2.5) |" in out  # channel LN left out, as the paper
    assert "resize 248 (bicubic), centre crop 224" in out  # the detail block of a named model


def test_info_json_includes_ablation_rows(capsys):
    assert main(["info", "poolformer_s12", "--ablation", "random", "no_mlp", "--json"]) == 0
    rows = {r["model"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["s12 ablation: random"]["frozen"] > 21e6 and round(rows["s12 ablation: random"]["gmacs"], 1) == 3.3
    assert rows["s12 ablation: no_mlp"]["params"] == 2_451_368


def test_info_unknown_model_is_one_clear_line(capsys):
    assert main(["info", "poolformer_s13"]) == 2
    assert "did you mean poolformer_s36, poolformer_s12" in capsys.readouterr().err
