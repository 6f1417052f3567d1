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
