"""The layers hold: no import cycle in savpack or savpack_runtime, counting imports inside functions too (a cycle
hidden behind a function-level import is still a cycle); the runtime never imports the builder."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"savpack": ROOT / "savpack", "savpack_runtime": ROOT / "runtime" / "savpack_runtime"}


def module_files() -> dict[str, Path]:
    """Every module of the two packages by dotted name (a package is its __init__.py)."""
    modules = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `name` imports anywhere in its body (module level, functions, methods)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module
            # `from package import submodule` depends on the submodule; `from module import name` on the module.
            targets = [f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in modules else origin for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import savpack.models.x` -> the deepest project module named
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each as a sorted list."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
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


def test_the_package_import_graph_has_no_cycles():
    graph = import_graph()
    assert len(graph) > 40 and graph["savpack.cli"]  # the scan sees the packages, and function-level imports
    assert cycles(graph) == []


def test_the_runtime_never_imports_the_builder():
    graph = import_graph()
    reaching = {name: sorted(target for target in targets if target.split(".")[0] == "savpack")
                for name, targets in graph.items() if name.split(".")[0] == "savpack_runtime"}
    assert {name: targets for name, targets in reaching.items() if targets} == {}


def test_the_cycle_finder_finds_function_level_cycles(tmp_path):
    """The finder itself can fail: a cycle made only of imports inside functions is found."""
    (tmp_path / "a.py").write_text("def f():\n    from . import b\n")
    (tmp_path / "b.py").write_text("import os\n\ndef g():\n    from .a import f\n")
    modules = {"pkg": tmp_path / "__init__.py", "pkg.a": tmp_path / "a.py", "pkg.b": tmp_path / "b.py"}
    (tmp_path / "__init__.py").write_text("")
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    assert graph == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}}
    assert cycles(graph) == [["pkg.a", "pkg.b"]]
