"""nvlm.eval is one-way: cli -> runner -> benchmarks -> readers -> sources/items/prompts/scorers. No module
imports, at any level (function-level imports included), a module that imports it back."""

from __future__ import annotations

import ast
from pathlib import Path

EVAL = Path(__file__).resolve().parents[2] / "nvlm" / "eval"


def _module(path: Path) -> str:
    parts = path.relative_to(EVAL.parent.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    modules = {_module(p): p for p in EVAL.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):  # every level, not just the top
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets.add(node.module)
                targets |= {f"{node.module}.{a.name}" for a in node.names}  # `from pkg import submodule`
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        stack.pop()
        return None

    return next((c for n in sorted(graph) if n not in state and (c := visit(n))), None)


def test_no_import_cycles_in_nvlm_eval():
    graph = _graph()
    assert "nvlm.eval.runner" in graph["nvlm.eval.cli"]  # the graph sees function-level imports
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_library_layers_point_one_way():
    graph = _graph()
    assert "nvlm.eval.cli" not in graph["nvlm.eval.runner"]
    readers = {m for m in graph if m.startswith("nvlm.eval.readers_")}
    assert readers and all("nvlm.eval.benchmarks" not in graph[r] for r in readers)
    assert readers <= graph["nvlm.eval.benchmarks"]


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
