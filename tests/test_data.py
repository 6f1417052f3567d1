"""Data checks: folder layout errors before training, unreadable images, the built-in digits split, the built-in
odd-one-out task."""
import numpy as np
import pytest
from PIL import Image

from metaformer import data as D
from metaformer.cli import main

TINY = ["--depths", "1", "1", "1", "1", "--dims", "8", "16", "24", "32", "--img-size", "32", "--aa", "",
        "--mixup", "0", "--cutmix", "0", "--reprob", "0", "--warmup-epochs", "0"]


def make_folder(root, classes=("cat", "dog"), n_train=6, n_val=3, flat_val=False):
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for c in classes:
            d = root / split if (split == "val" and flat_val) else root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(d / f"{c}_{i}.png")
    return root


def test_flat_val_folder_stops_before_training(tmp_path, capsys):
    data = make_folder(tmp_path / "data", flat_val=True)
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--output", str(out), *TINY]) == 2
    err = capsys.readouterr().err
    assert "val has 6 images" in err and "no class sub-folders" in err and "accuracy would be ~0%" in err
    assert not out.exists()  # nothing started


def test_differing_class_sets_stop_before_training(tmp_path, capsys):
    data = make_folder(tmp_path / "data")
    (data / "val" / "dog").rename(data / "val" / "dogs")
    assert main(["train", "--data", str(data), "--output", str(tmp_path / "run"), *TINY]) == 2
    err = capsys.readouterr().err
    assert "different classes" in err and "only in train: dog" in err and "only in val: dogs" in err


def test_missing_val_and_missing_dir(tmp_path):
    with pytest.raises(D.DataError, match="does not exist"):
        D.check_image_folder(tmp_path / "nope")
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(D.DataError, match="no val/ folder"):
        D.check_image_folder(tmp_path)


def test_unreadable_image_is_skipped_and_listed(tmp_path, capsys):
    data = make_folder(tmp_path / "data")
    bad = data / "train" / "cat" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--output", str(out), "--epochs", "1", "--batch-size", "13",
                 "--workers", "0", *TINY]) == 0
    captured = capsys.readouterr()
    assert "skipped 1 unreadable image(s)" in captured.err + captured.out
    assert str(bad) in captured.err + captured.out
    assert (out / "metrics.csv").read_text().splitlines()[1].split(",")[-1] == "1"


def test_strict_data_names_the_file_with_workers(tmp_path, capsys):
    data = make_folder(tmp_path / "data")
    bad = data / "train" / "dog" / "truncated.png"
    bad.write_bytes((data / "train" / "dog" / "dog_0.png").read_bytes()[:60])
    rc = main(["train", "--data", str(data), "--output", str(tmp_path / "run"), "--epochs", "1",
               "--batch-size", "4", "--workers", "2", "--strict-data", *TINY])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"unreadable image {bad}" in err and "--strict-data" in err
    assert "Traceback" not in err


def test_digits_split_is_fixed_and_stratified():
    train, val = D.Digits("train", 32), D.Digits("val", 32)
    assert (len(train), len(val)) == (1437, 360)
    assert np.bincount(val.targets).min() >= 35  # every digit ~20% in val
    assert D.Digits("val", 32).targets == val.targets
    img = val.images[0]
    assert img.size == (32, 32) and img.mode == "RGB"


def _scan_of_each_quadrant(image, split):
    """Which scan (index, digit) each quadrant of a noise-free odd-one-out image holds, found by matching its
    pixels against every scan at every place in the quadrant."""
    from metaformer.data.builtin import OddOneOut
    from metaformer.data.digits import digit_scans

    scans, labels = digit_scans(split)
    cell, z = OddOneOut.CANVAS // 2, OddOneOut.DIGIT_SIZE
    tiles = {np.asarray(Image.fromarray((s * (255 / 16)).round().astype(np.uint8), "L").resize(
        (z, z), Image.BICUBIC)).tobytes(): (i, int(k)) for i, (s, k) in enumerate(zip(scans, labels))}
    found = []
    for y, x in ((0, 0), (0, 1), (1, 0), (1, 1)):
        q = image[y * cell:(y + 1) * cell, x * cell:(x + 1) * cell]
        hits = [tiles[q[a:a + z, b:b + z].tobytes()] for a in range(cell - z + 1) for b in range(cell - z + 1)
                if q[a:a + z, b:b + z].tobytes() in tiles and q.sum() == q[a:a + z, b:b + z].sum()]
        found.append(hits[0])  # an IndexError: a quadrant that is no scan of this split
    return found


def test_odd_one_out_labels_the_quadrant_of_the_odd_digit(monkeypatch):
    from metaformer.data import builtin

    train, val = D.OddOneOut("train"), D.OddOneOut("val")
    assert (len(train), len(val)) == (9_000, 2_000)
    assert np.bincount(train.targets).min() > 2_050  # the four quadrants about equally often
    again = D.OddOneOut("val")
    assert np.array_equal(again.images, val.images) and again.targets == val.targets  # the same set every time
    img, target = val[0]
    assert img.size == (32, 32) and img.mode == "RGB" and target == val.targets[0]
    assert D.OddOneOut("val", img_size=48).images.shape == (2000, 48, 48)
    monkeypatch.setattr(builtin.OddOneOut, "NOISE", 0)  # without it, every quadrant is one scan, found exactly
    builtin._odd_one_out.cache_clear()
    try:
        clean = D.OddOneOut("val").images.astype(int)
        unclipped = (clean > 60) & (clean < 195)
        assert 35 < (val.images - clean)[unclipped].std() < 45  # the same images, plus the pixel noise
        for split in ("train", "val"):  # val images hold only val scans: new handwriting
            ds = D.OddOneOut(split)
            for i in range(20):
                scans = _scan_of_each_quadrant(ds.images[i], split)
                odd = ds.targets[i]
                rest = scans[:odd] + scans[odd + 1:]
                assert len(set(rest)) == 1 and scans[odd][1] != rest[0][1], (split, i, scans, odd)
    finally:
        builtin._odd_one_out.cache_clear()


def test_builtin_names_and_their_errors():
    assert [D.builtin_name(d) for d in (None, "", "builtin", "digits", "builtin:digits", "Builtin:Odd-One-Out")] == [
        "digits"] * 5 + ["odd-one-out"]
    assert D.builtin_name("/data/imagenet") is None and not D.is_builtin("runs/x")
    with pytest.raises(D.DataError, match="no built-in data set 'mnist'; built-in: builtin:digits, builtin:odd-one-out"):
        D.builtin_name("builtin:mnist")
    assert D.eval_crop("builtin:odd-one-out") == 1.0 and D.eval_crop("builtin") is None and D.eval_crop("/x") is None


def test_train_and_eval_on_the_odd_one_out_task(tmp_path, capsys):
    """`train --data builtin:odd-one-out` follows that set's recipe (whole images, no augmentation that moves a
    quadrant) and evaluates uncropped; `eval` on the set scores the checkpoint the same, and refuses a model
    trained on other classes."""
    out = tmp_path / "run"
    assert main(["train", "--data", "builtin:odd-one-out", "--epochs", "1", "--depths", "1", "1", "1", "1", "--dims",
                 "8", "8", "16", "16", "--output", str(out)]) == 0
    log = capsys.readouterr()
    assert "recipe: the built-in odd-one-out recipe" in log.out + log.err
    cfg = (out / "config.yaml").read_text()
    assert "aa: null" in cfg and "scale:\n- 1.0\n- 1.0" in cfg and "ratio:\n- 1.0\n- 1.0" in cfg
    trained = float(next(line for line in (out / "metrics.csv").read_text().splitlines()[1:]).split(",")[7])
    assert main(["eval", "--checkpoint", str(out / "last.pth"), "--data", "builtin:odd-one-out", "--json"]) == 0
    import json

    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["top1"] == pytest.approx(trained) and evaluated["data"] == "builtin odd-one-out (val)"
    assert main(["eval", "--checkpoint", str(out / "last.pth"), "--data", "builtin:digits"]) == 2
    assert "the built-in digits need a model trained on them (10 classes" in capsys.readouterr().err


def test_randaugment_posterize_at_full_magnitude_does_not_crash():
    """The recipe's RandAugment ('rand-m9-mstd0.5-inc1' reaches magnitude 10: keep 0 bits) gives a black image
    where Pillow >= 12 raises; fixed in the transform's own ops, timm's table is left as it was."""
    from timm.data import auto_augment

    from metaformer import get_model_info
    from metaformer.tasks.train_config import TrainConfig

    cfg = TrainConfig(img_size=32)
    assert cfg.aa == "rand-m9-mstd0.5-inc1"
    table = dict(auto_augment.NAME_TO_OP)
    tf = D.train_transform(cfg, get_model_info("poolformer_s12").preprocessing())
    assert auto_augment.NAME_TO_OP == table and auto_augment.NAME_TO_OP["PosterizeIncreasing"] is auto_augment.posterize
    ops = [op for op in D.transforms.augment_ops(tf) if op.name == "PosterizeIncreasing"]
    assert len(ops) == 1
    ops[0].prob, ops[0].magnitude, ops[0].magnitude_std = 1.0, 10, 0
    img = Image.new("RGB", (8, 8), (200, 100, 50))
    assert np.asarray(ops[0](img)).max() == 0  # 0 bits kept: black, as older Pillow did
