"""The repository stands on its own: nothing tracked points at files users do not have."""
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tracked() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        return [ROOT / line for line in out.splitlines()]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every file but the environment's
        return [p for p in ROOT.rglob("*") if p.is_file() and ".venv" not in p.parts and ".git" not in p.parts]


def test_no_pointers_outside_the_repository():
    pattern = re.compile(r"REFERENCE\.md|\.\./shared")
    hits = []
    for path in _tracked():
        if path.suffix in {".png", ".jpg", ".whl"} or path == Path(__file__).resolve() or not path.is_file():
            continue
        text = path.read_text(errors="ignore")
        hits += [f"{path.relative_to(ROOT)}:{n}" for n, line in enumerate(text.splitlines(), 1) if pattern.search(line)]
    assert not hits, hits


def test_the_wheel_ships_every_recipe_the_docs_use(tmp_path):
    """`--config configs/...` commands work from an installed wheel, not only in the clone: the recipes are package
    data, and a clone path or a bare name finds the packaged copy from any folder."""
    import sys
    import zipfile

    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(tmp_path), str(ROOT)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    names = zipfile.ZipFile(next(tmp_path.glob("metaformer-*.whl"))).namelist()
    shipped = sorted(n.rsplit("/", 1)[1] for n in names if n.startswith("metaformer/configs/"))
    assert shipped == sorted(p.name for p in (ROOT / "src/metaformer/configs").glob("*.yaml")) and shipped
    assert (ROOT / "configs").resolve() == (ROOT / "src/metaformer/configs").resolve()  # the clone's path


def test_config_names_resolve_to_the_packaged_recipes(tmp_path, monkeypatch):
    import pytest

    from metaformer.errors import ConfigError
    from metaformer.tasks.train_config import CONFIGS, config_path

    monkeypatch.chdir(tmp_path)  # a folder without configs/
    for name in ("digits_demo", "digits_demo.yaml", "configs/digits_demo.yaml"):
        assert Path(config_path(name)) == CONFIGS / "digits_demo.yaml"
    (tmp_path / "mine.yaml").write_text("epochs: 3\n")
    assert config_path("mine.yaml") == "mine.yaml"
    with pytest.raises(ConfigError, match="does not exist; the recipes shipped with metaformer .*digits_demo"):
        config_path("other/digits_demo.yaml")
