"""The house's structure: no import cycle among the suite's modules, and the report reads no torch or method.

The import graph is read from the source (every `import` statement, inside functions too), so a cycle
hidden behind a function-level import counts as well.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import REPO

PACKAGES = {"adadiff_bench": REPO / "adadiff_bench", "adadiff_bench.baselines": REPO / "baselines"}


def module_files() -> dict[str, Path]:
    """Module name -> file, for the package and the baselines (installed as adadiff_bench.baselines)."""
    modules = {}
    for package, root in PACKAGES.items():
        for path in root.rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The suite's modules that `name` imports anywhere in its source (resolved to modules that exist)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `from pkg import function` -> pkg
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imported_modules(name, path, set(files)) for name, path in files.items()}


def test_the_reader_of_the_graph_sees_known_edges():
    graph = import_graph()
    assert "adadiff_bench.methods.registry" in graph["adadiff_bench.training"]
    assert "adadiff_bench.training" in graph["adadiff_bench.methods.adadiff.training"]
    assert "adadiff_bench.methods.block_cache" in graph["adadiff_bench.baselines.deepcache"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_importing_the_suite_imports_nothing_heavy():
    """The package, its metric specs and its plugin loader are read by reports: no torch behind them."""
    code = ("import sys, adadiff_bench, adadiff_bench.metrics.specs, adadiff_bench.plugins, adadiff_bench.errors; "
            "print([m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'fvcore', 'torch_fidelity')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"
