"""The import graph of the library, built from the source: no cycles, and no import that goes up a layer.

Every ``import`` / ``from ... import`` counts, module level or inside a function. The layers (each imports
only its own layer and those below; docs/development.md says where a new method's pieces go):
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# installed package name -> source folder (pyproject's package-dir)
PACKAGES = {"diffattn": ROOT / "diffattn", "diffattn.pipelines": ROOT / "pipelines", "diffattn.lora": ROOT / "lora"}

# (layer, module prefixes); a module belongs to the layer of its longest matching prefix
LAYERS: list[tuple[int, tuple[str, ...]]] = [
    (0, ("diffattn.io", "diffattn.ops")),
    (1, ("diffattn.masks",)),
    (2, ("diffattn.models",)),
    (3, ("diffattn.context", "diffattn.registry", "diffattn.denoisers", "diffattn.presets")),
    (4, ("diffattn.processors",)),
    (5, ("diffattn.api", "diffattn")),  # the package root re-exports the api
    (6, ("diffattn.calibration", "diffattn.benchmark", "diffattn.pipelines")),
    (7, ("diffattn.zoo", "diffattn.testbed", "diffattn.testbed.models", "diffattn.testbed.data",
         "diffattn.testbed.classifier", "diffattn.testbed.xpred_wan")),
    (8, ("diffattn.loading", "diffattn.checks")),
    (9, ("diffattn.lora",)),
    (10, ("diffattn.testbed.training", "diffattn.testbed.evaluate", "diffattn.testbed.commands",
          "diffattn.testbed.metrics", "diffattn.testbed.lamamba")),
    (11, ("diffattn.cli", "diffattn.bench_cli")),
]


def modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for pkg, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if pkg == "diffattn" and parts[0] in ("pipelines", "lora"):
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([pkg, *parts])] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The library modules ``name`` imports anywhere in its source (``from pkg import sub`` -> ``pkg.sub``)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "diffattn")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "diffattn":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.add(sub if sub in known else target)
    return {m for m in out if m != name}


def layer_of(name: str) -> int:
    best = max(
        ((len(prefix), layer) for layer, prefixes in LAYERS for prefix in prefixes
         if name == prefix or name.startswith(prefix + ".")),
        default=None,
    )
    if best is None:
        raise AssertionError(f"{name} has no layer: add it to LAYERS in tests/test_layers.py and the docs")
    return best[1]


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def upward(edges: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{src} (layer {layer_of(src)}) imports {dst} (layer {layer_of(dst)})"
        for src, dsts in edges.items()
        for dst in dsts
        if layer_of(dst) > layer_of(src)
    )


def test_every_module_has_a_layer() -> None:
    for name in modules():
        layer_of(name)


def test_no_import_cycles() -> None:
    assert cycles(graph()) == []


def test_no_upward_imports() -> None:
    assert upward(graph()) == []


def test_checker_catches_a_cycle_and_an_upward_import() -> None:
    edges = {"diffattn.ops.a": {"diffattn.api"}, "diffattn.api": {"diffattn.ops.a"}}
    assert cycles(edges) == [["diffattn.api", "diffattn.ops.a"]]
    assert upward(edges) == ["diffattn.ops.a (layer 0) imports diffattn.api (layer 5)"]


def test_imports_inside_functions_are_seen(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from ..api import apply\n    import diffattn.cli\n")
    found = imports("diffattn.ops.m", src, {"diffattn.api": src, "diffattn.cli": src})
    assert found == {"diffattn.api", "diffattn.cli"}


def test_loading_a_testbed_model_needs_no_training_code() -> None:
    edges = graph()
    seen, todo = set(), ["diffattn.testbed.models"]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo.extend(edges.get(m, ()))
    training = sorted(m for m in seen if m.startswith(("diffattn.lora", "diffattn.testbed.training")))
    assert training == []


@pytest.mark.parametrize("package", ["diffattn.processors", "diffattn.lora"])
def test_builtins_are_registered_in_one_place(package: str) -> None:
    # method and recipe modules define their records; only api.py / lora/recipes.py register them
    registering = sorted(
        name for name, path in modules().items()
        if name.startswith(package) and ("\nregister(" in path.read_text() or "\nregister_recipe(" in path.read_text())
        and name != "diffattn.lora.recipes"
    )
    assert registering == []
