"""The package's imports go one way (torchtitan: model → parallelize → trainer; nanochat: library vs scripts).

Every ``import`` of an ``nvlm`` module counts, at any level (a function-level import is still a dependency).
No module may reach itself again through its imports; ``nvlm.distributed`` never imports ``nvlm.training``;
``nvlm.training`` never imports ``nvlm.bench`` (the benchmarks build on training, not the other way); the model
and the vision encoder never import data loading, the processor, training, distribution, evaluation, serving, the
formats of other checkpoints (``nvlm.interop``) or the loaders that tell them apart (``nvlm.loading``, above
them all); and only the command-line entry points import the demo (it registers its own recipes and scorer).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "nvlm"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: nvlm modules it imports}, with `from nvlm.a import b` resolved to nvlm.a.b when b is a module."""
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [(a.name, None) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from .x import y
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
                targets = [(base, a.name) for a in node.names]
            else:
                continue
            for mod, attr in targets:
                if attr and f"{mod}.{attr}" in modules:
                    deps.add(f"{mod}.{attr}")
                elif mod in modules:
                    deps.add(mod)
        deps.discard(name)
        graph[name] = {d for d in deps if not name.startswith(d + ".")}  # a package's own __init__ is no cycle
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_function_level_imports():
    graph = import_graph()
    assert "nvlm.models.nvlm" in graph and "nvlm.models.xattn" in graph["nvlm.models.nvlm"]
    assert "nvlm.inference.generate" in graph["nvlm.models.nvlm"]  # imported inside NVLM.generate


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_a_cycle_would_be_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize(
    ("layer", "forbidden"),
    [
        ("nvlm.distributed", ("nvlm.training", "nvlm.eval", "nvlm.serve", "nvlm.demo")),
        ("nvlm.training", ("nvlm.bench",)),
        (
            "nvlm.models",
            (
                "nvlm.training",
                "nvlm.distributed",
                "nvlm.eval",
                "nvlm.serve",
                "nvlm.demo",
                "nvlm.data.blend",
                "nvlm.data.formats",
                "nvlm.data.prefetch",
                "nvlm.data.processor",
                "nvlm.interop",
                "nvlm.loading",
            ),
        ),
        (
            "nvlm.vision",
            (
                "nvlm.models",
                "nvlm.data",
                "nvlm.training",
                "nvlm.distributed",
                "nvlm.eval",
                "nvlm.demo",
                "nvlm.interop",
                "nvlm.loading",
            ),
        ),
        ("nvlm.interop", ("nvlm.loading", "nvlm.training", "nvlm.serve", "nvlm.eval", "nvlm.demo")),
    ],
)
def test_layers_import_one_way(layer, forbidden):
    bad = sorted(
        (m, d) for m, deps in import_graph().items() if m.startswith(layer) for d in deps if d.startswith(forbidden)
    )
    assert bad == []


def test_only_entry_points_import_the_demo():
    entry = ("nvlm.cli", "nvlm.__main__", "nvlm.repro")  # nvlm repro is a script-level package, like the demo
    bad = sorted(
        (m, d)
        for m, deps in import_graph().items()
        if not m.startswith(("nvlm.demo", *entry))
        for d in deps
        if d.startswith("nvlm.demo")
    )
    assert bad == []


def test_only_the_command_line_imports_repro():
    bad = sorted(
        (m, d)
        for m, deps in import_graph().items()
        if not m.startswith(("nvlm.repro", "nvlm.cli", "nvlm.__main__"))
        for d in deps
        if d.startswith("nvlm.repro")
    )
    assert bad == []


def test_only_benchmarks_and_entry_points_import_the_test_kits():
    """``nvlm.testing`` (tiny backbones, release replicas) serves tests, benchmarks and the demo: no library
    path depends on it."""
    users = ("nvlm.testing", "nvlm.bench", "nvlm.demo", "nvlm.repro", "nvlm.cli", "nvlm.data.cli")
    bad = sorted(
        (m, d)
        for m, deps in import_graph().items()
        if not m.startswith(users)
        for d in deps
        if d.startswith("nvlm.testing")
    )
    assert bad == []
