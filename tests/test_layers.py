"""The package's one-way layers, read off the source: models <- weights <- zoo <- data | engine | fast
<- tasks <- tools <- cli. A module may import its own package and the layers below it, never above
(lazy imports inside functions count too: they are dependencies all the same), the three
middle packages not each other; and no import cycle among module-level imports."""
import ast
import graphlib
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "metaformer"
LAYERS = [
    {"errors", "yaml12", "atomic", "ranges"},  # no dependencies of ours
    {"models"},
    {"weights"},
    {"zoo"},
    {"data", "engine", "fast"},  # independent of each other
    {"tasks"},
    {"tools"},
    {"cli"},
]
LEVEL = {pkg: i for i, group in enumerate(LAYERS) for pkg in group}


def modules():
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield path, ["metaformer", *parts]


def imports(path: Path, name: list[str], top_level_only: bool = False):
    """Every ``metaformer.*`` module the file imports (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name[:-1]
    nodes = tree.body if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = base + (node.module.split(".") if node.module else [])
            else:
                target = (node.module or "").split(".")
            if target[:1] == ["metaformer"]:
                yield target, [target + [a.name] for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "metaformer":
                    yield a.name.split("."), []


def package_of(target: list[str]) -> str | None:
    return target[1] if len(target) > 1 else None


def test_every_package_has_a_layer():
    top = {p.stem if p.is_file() else p.name for p in SRC.iterdir() if p.name != "__pycache__" and
           (p.suffix == ".py" or (p.is_dir() and any(p.glob("*.py"))))}  # configs/: data (the recipes)
    assert top - {"__init__", "__main__"} == set(LEVEL), "add new packages to LAYERS"


@pytest.mark.parametrize("path,name", [(p, n) for p, n in modules() if len(n) > 1 and n[1] in LEVEL],
                         ids=lambda v: ".".join(v) if isinstance(v, list) else "")
def test_imports_only_go_down(path, name):
    own = name[1]
    for target, names in imports(path, name):
        candidates = [t for t in names if package_of(t) in LEVEL] or [target]
        for t in candidates:
            pkg = package_of(t)
            if pkg is None or pkg == own:
                continue
            assert pkg in LEVEL, f"{'.'.join(name)} imports {'.'.join(t)}"
            assert LEVEL[pkg] < LEVEL[own] or (LEVEL[pkg] == 0 and LEVEL[own] == 0), \
                f"{'.'.join(name)} ({own}, layer {LEVEL[own]}) imports {'.'.join(t)} ({pkg}, layer {LEVEL[pkg]})"


def assert_acyclic(graph: dict[str, set[str]], what: str) -> None:
    """No circle in ``graph`` (a module -> the modules it imports); a circle found is named, importer first."""
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as e:  # its circle lists each module before the one that imports it
        raise AssertionError(f"{what}: " + " -> ".join(reversed(e.args[1]))) from None


def test_no_import_cycles():
    graph = {}
    for path, name in modules():
        key = ".".join(name)
        deps = set()
        for target, _ in imports(path, name, top_level_only=True):
            deps.add(".".join(target))
        graph[key] = {d for d in deps if d != key}
    known = set(graph)

    def resolve(dep):  # `from metaformer.zoo import x`: the package module
        while dep and dep not in known:
            dep = dep.rsplit(".", 1)[0] if "." in dep else ""
        return dep

    graph = {k: {resolve(d) for d in v} - {"", k} for k, v in graph.items()}
    # A package's __init__ importing its own modules is how packages work, not a cycle of design.
    assert_acyclic({k: {d for d in v if not (d.startswith(k + ".") or k.startswith(d + ".") or d == "metaformer")}
                    for k, v in graph.items()}, "import cycle")


def test_no_circle_among_the_parts_of_a_package():
    """The parts of a package (its modules, a subpackage counting as one part) import each other one way, with no
    circle at module level: ``tasks.detection`` (a training loop) imports ``tasks.dense`` (the networks, data and
    runs), which never imports it back; the same inside ``tasks.dense`` and ``tools.bench``. (test_no_import_cycles
    sees single modules, so a circle through a subpackage passes it.)"""
    edges = {}
    for path, name in modules():
        for target, names in imports(path, name, top_level_only=True):
            for t in names or [target]:
                for depth in range(3, len(name) + 1):
                    a, b = tuple(name[:depth]), tuple(t[:depth])
                    if len(t) >= depth and a[:-1] == b[:-1] and a != b:
                        edges.setdefault(".".join(a), set()).add(".".join(b))
    assert_acyclic(edges, "circle")


def test_import_metaformer_leaves_the_training_stack_alone():
    """`import metaformer` after timm registers the models in timm, and loads no training, detection or plotting
    code; alone it imports neither torch nor timm (names load on first use), and a first use registers them."""
    import subprocess
    import sys

    heavy = ("'tensorboard', 'matplotlib', 'pycocotools', 'sklearn', 'onnx', 'onnxruntime', 'pytorch_grad_cam', "
             "'metaformer.tasks', 'metaformer.tools.bench', 'metaformer.cli', 'scipy'")
    code = (f"import sys, timm, metaformer; heavy = [m for m in ({heavy}) if m in sys.modules]; print(heavy); "
            "assert 'metaformer_poolformer_s12' in timm.list_models('metaformer_*')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
    code = ("import sys, metaformer; print([m for m in ('torch', 'timm') if m in sys.modules]); "
            "metaformer.list_models(); import timm; print(len(timm.list_models('metaformer_*')) > 40)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["[]", "True"], out.stdout
