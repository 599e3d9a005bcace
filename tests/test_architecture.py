"""The import rule of docs/architecture.md: no import circles among the project's modules, and a
lower layer never imports a higher one. Every import counts, including those inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "harness"

# layer of each part of the package (a module may import only from its own layer or lower ones)
LAYERS = {
    "harness.errors": 0,
    "harness.registry": 0,
    "harness.config": 0,
    "harness.records": 0,
    "harness.hooks": 0,
    "harness.schemas": 0,
    "harness.build": 0,
    "harness.metrics": 1,
    "harness.infra": 1,
    "harness.data": 2,
    "harness.models": 2,
    "harness.techniques": 3,
    "harness.run": 4,
    "harness.analysis": 4,
    "harness.study": 5,
    "harness.cli": 6,
    "harness.__main__": 6,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PKG.rglob("*.py")}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Project modules imported by a file (``from a.b import c`` counts as ``a.b.c`` when that is a module)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "harness")
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] != "harness":
                continue
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in known else node.module)
    return {m for m in out if m in known}


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    # a package's __init__ importing its own submodules (to register them) is not an edge back up
    return {m: {d for d in imports_of(p, known) if d != m} for m, p in mods.items()}


def layer(mod: str) -> int | None:
    best = None
    for prefix, n in LAYERS.items():
        if mod == prefix or mod.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, n)
    return None if best is None else best[1]


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for d in sorted(g.get(n, ())):
            if state.get(d) == 1:
                return stack[stack.index(d) :] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(g):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_find_cycle_detects_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle_among_the_projects_modules():
    cycle = find_cycle(graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_every_module_has_a_layer_and_imports_only_downwards():
    g = graph()
    missing = sorted(m for m in g if layer(m) is None and m != "harness")
    assert not missing, f"modules with no layer in LAYERS: {missing}"
    bad = [
        f"{m} (layer {layer(m)}) imports {d} (layer {layer(d)})"
        for m, deps in g.items()
        for d in deps
        if m != "harness" and layer(d) is not None and layer(d) > layer(m)
    ]
    assert not bad, "imports against the layer rule:\n" + "\n".join(sorted(bad))


def test_techniques_is_not_a_top_level_package():
    assert not (ROOT / "techniques").exists()
    assert (PKG / "techniques" / "__init__.py").exists()
