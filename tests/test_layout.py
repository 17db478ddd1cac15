"""The house shows its plan: engine/'s subpackages are its layers, imports only point down, no circles.

Every import is read from the source (lazy ones inside functions included), so a circle or an upward
import fails here even when no test happens to execute it.
"""
import ast
import importlib.metadata
import inspect
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENGINE = ROOT / "engine"

# Lowest first. A module may import a lower layer, or its own subpackage (or, in layer 0, layer 0).
LAYERS = {
    "engine": 0, "engine.errors": 0, "engine.files": 0, "engine.config": 0,
    "engine.formulas": 1,
    "engine.sampling": 2, "engine.data": 2,
    "engine.models": 3, "engine.losses": 3,
    "engine.stages": 4, "engine.eval": 4,
    "engine.trainer": 5,
    "engine.cli": 6,
    "engine.train": 7,      # the documented launcher, a shim over engine.cli.train
    "engine.import_weights": 7,   # `python -m engine.import_weights`, a shim over engine.cli.import_weights
    "engine.evaluate": 7,         # `python -m engine.evaluate`, a shim over engine.cli.evaluate
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(package_dir: Path) -> dict[str, Path]:
    return {module_name(p): p for p in package_dir.rglob("*.py")}


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The modules of ``known`` that ``path`` imports anywhere in its source."""
    out = set()
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != this:
                out.add(name)
    return out


def layer_of(name: str) -> tuple[str, int]:
    for unit in sorted(LAYERS, key=len, reverse=True):
        if name == unit or name.startswith(unit + "."):
            return unit, LAYERS[unit]
    raise AssertionError(f"{name} belongs to no layer: add its subpackage to LAYERS (and to the README's tree)")


@pytest.fixture(scope="module")
def graph():
    known = modules(ENGINE)
    return {name: imports(path, known) for name, path in known.items()}


def test_no_import_circles_inside_engine(graph):
    done, stack = set(), []

    def visit(node):
        if node in stack:
            raise AssertionError("import circle: " + " -> ".join(stack[stack.index(node):] + [node]))
        if node in done:
            return
        stack.append(node)
        for target in sorted(graph[node]):
            visit(target)
        stack.pop()
        done.add(node)

    for node in sorted(graph):
        visit(node)


def test_imports_only_point_down_the_layers(graph):
    upward = []
    for source, targets in graph.items():
        unit, layer = layer_of(source)
        for target in targets:
            target_unit, target_layer = layer_of(target)
            if not (target_layer < layer or target_unit == unit or target_layer == layer == 0):
                upward.append(f"{source} (layer {layer}) imports {target} (layer {target_layer})")
    assert not upward, "\n".join(upward)


def test_kernels_stand_alone():
    known = {**modules(ROOT / "kernels"), **modules(ENGINE)}
    for path in (ROOT / "kernels").rglob("*.py"):
        assert not [t for t in imports(path, known) if t.startswith("engine")], f"{path} imports engine"


def test_engine_has_few_top_level_modules_none_named_like_an_installed_module():
    top = sorted(p.stem for p in ENGINE.glob("*.py"))
    assert len(top) <= 8, top
    # `python engine/train.py` puts engine/ first on sys.path: a name there would shadow the real module
    taken = set(sys.stdlib_module_names) | set(importlib.metadata.packages_distributions())
    names = top + [p.name for p in ENGINE.iterdir() if (p / "__init__.py").is_file()]
    assert not [n for n in names if n in taken and n != "__init__"], names
    assert {p.name for p in ENGINE.iterdir() if (p / "__init__.py").is_file()} == \
        {unit.split(".")[1] for unit in LAYERS if unit.count(".") == 1 and (ENGINE / unit.split(".")[1]).is_dir()}


def test_the_training_loop_reads_in_one_sitting():
    from engine.trainer.loop import Trainer

    lines, _ = inspect.getsourcelines(Trainer.fit)
    assert len(lines) <= 200, f"Trainer.fit is {len(lines)} lines"


def test_readme_is_short_and_the_deviations_are_written_down():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200
    assert (ROOT / "docs" / "deviations.md").is_file()
    assert (ROOT / "docs" / "method.md").is_file()


def test_code_cites_the_paper_or_docs_not_missing_files_or_issues():
    bad = []
    for path in [*ENGINE.rglob("*.py"), *(ROOT / "kernels").rglob("*.py"), *(ROOT / "benchmarks").glob("*.py"),
                 *(ROOT / "tools").glob("*.py"), *(ROOT / "configs").rglob("*.yaml"), ROOT / "setup.py",
                 ROOT / "Makefile"]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            missing = [f for f in re.findall(r"\b(?:docs|tests)/[\w/.-]+\.(?:py|md)", line) if not (ROOT / f).is_file()]
            if missing or re.search(r"\bSPEC\b|\bissue #?\d|\(#\d+\)", line):
                bad.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not bad, "\n".join(bad)


def test_no_test_module_imports_another():
    tests = ROOT / "tests"
    local = {p.stem for p in tests.rglob("*.py")}
    for path in tests.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                first = name.split(".")[0]
                assert first not in local and first != "tests", f"{path.relative_to(ROOT)} imports {name}"
