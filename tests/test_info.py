"""`metaformer info`: the paper's parameter and MAC figures, from the command line."""
import json

import torch

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
    """The stored table is what a live count gives (the file cannot drift from the code), and its convolution,
    linear and matmul MACs are half the FLOPs torch's own FlopCounterMode counts in the same forward pass (a
    counter independent of ours)."""
    from torch.utils.flop_counter import FlopCounterMode

    from metaformer.tools.complexity import count_macs, count_params
    from metaformer.zoo import create_model, list_models
    from metaformer.zoo.registry import complexity

    for name in list_models():
        with torch.device("meta"):
            model = create_model(name)
        with FlopCounterMode(display=False) as torch_count:
            macs = count_macs(model)
        params = count_params(model)
        assert complexity(name) == {"params": params["trainable"], "frozen": params["frozen"], "macs": macs["total"],
                                    "macs_conv_linear": macs["matmul_conv"]}, name
        assert torch_count.get_total_flops() == 2 * macs["matmul_conv"], name
    assert main(["info", "poolformer_s12", "--img-size", "256", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    assert row["gmacs"] > 1.823 * (256 / 224) ** 2 * 0.99


def test_s12_figures_counted_by_hand():
    """PoolFormer-S12 at 224 from its description alone (the paper's convention: convolutions and linears, plus
    5 MACs per element for each affine GroupNorm): the 1.823 / 1.812 G that `metaformer info` prints."""
    from metaformer.zoo.registry import complexity

    depths, dims, grids = (2, 2, 6, 2), (64, 128, 320, 512), (56, 28, 14, 7)
    convs = grids[0] ** 2 * dims[0] * 3 * 7 * 7  # stem: k7 s4 over RGB
    convs += sum(g * g * c * c_in * 9 for g, c, c_in in zip(grids[1:], dims[1:], dims[:-1]))  # k3 s2 downsampling
    convs += sum(d * g * g * 2 * c * 4 * c for d, g, c in zip(depths, grids, dims))  # fc1 and fc2, ratio 4
    convs += dims[-1] * 1000  # classifier
    norms = 5 * sum(d * 2 * c * g * g for d, g, c in zip(depths, grids, dims)) + 5 * dims[-1] * grids[-1] ** 2
    assert complexity("poolformer_s12")["macs_conv_linear"] == convs == 1_812_267_008
    assert complexity("poolformer_s12")["macs"] == convs + norms
    assert f"{(convs + norms) / 1e9:.3f} | {convs / 1e9:.3f}" == "1.823 | 1.812"


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


def test_at_another_size_the_paper_columns_hold_that_size_figures_or_nothing(capsys):
    """At --img-size 384 the paper columns hold the authors' 384 figures where they published some (CAFormer-S18),
    else nothing; at 224 the 224 figures."""
    import json

    from metaformer.cli import main

    assert main(["info", "caformer_s18", "poolformer_s12", "--img-size", "384", "--json"]) == 0
    rows = {r["model"]: r for r in json.loads(capsys.readouterr().out)}
    s18 = rows["caformer_s18"]
    assert (s18["paper_gmacs"], s18["paper_top1"], s18["paper_source"]) == (13.4, 85.0, "caformer_s18.sail_in1k_384")
    assert abs(s18["gmacs"] - 13.4) < 0.05  # the counted MACs at 384 agree with the authors' 384 figure
    assert (rows["poolformer_s12"]["paper_gmacs"], rows["poolformer_s12"]["paper_top1"]) == (None, None)
    assert main(["info", "caformer_s18"]) == 0
    assert "| caformer_s18 | 26,341,656 | 4.107 | 4.107 | 26M | 4.1 | 83.6 |" in capsys.readouterr().out


def test_info_shows_a_tags_cached_copy_and_its_recorded_sha256(tmp_path, monkeypatch, capsys):
    import json

    from metaformer.cli import main

    monkeypatch.setenv("METAFORMER_CACHE", str(tmp_path))
    (tmp_path / "poolformer_s12.pth.tar").write_bytes(b"weights")
    (tmp_path / "poolformer_s12.pth.tar.sha256.json").write_text(json.dumps({"sha256": "ab" * 32}))
    assert main(["info", "poolformer_s12"]) == 0
    out = capsys.readouterr().out
    assert f"cached: {tmp_path / 'poolformer_s12.pth.tar'}, sha256 {'ab' * 32} (recorded at download)" in out
