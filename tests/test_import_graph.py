"""The house stays laid out: no import circle among streamssl's own modules, and no module reaching into another
module's `_private` names.

Imports under `if TYPE_CHECKING:` are not edges (they never run). Lazy imports inside functions are edges: they run,
and a circle through one is a circle a reader must untangle all the same.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("orchestrator", "trainers", "evaluators", "cli")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, here: str, is_package: bool):
    """(imported module, imported name or None, line) for every import that runs, resolving relative ones."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".") if is_package else here.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                yield base, alias.name, node.lineno
        stack.extend(ast.iter_child_nodes(node))


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    """Edges between our modules, and every `_private` name imported from another module."""
    modules = all_modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    private: list[str] = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        for target, imported, line in _imports(tree, name, path.name == "__init__.py"):
            if imported and f"{target}.{imported}" in modules:  # `from pkg import module`
                graph[name].add(f"{target}.{imported}")
            elif target in modules:
                graph[name].add(target)
                if imported and imported.startswith("_") and not imported.startswith("__") and target != name:
                    private.append(f"{path.relative_to(ROOT)}:{line} imports {target}.{imported}")
    for name in graph:
        graph[name].discard(name)
    return graph, private


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_another_in_a_circle() -> None:
    graph, _ = import_graph()
    assert len(graph) > 100, "the walk found too few modules to mean anything"
    assert cycles(graph) == []


def test_no_module_imports_another_modules_private_names() -> None:
    _, private = import_graph()
    assert private == []


def test_the_checker_sees_a_circle_and_a_private_import() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    tree = ast.parse("if TYPE_CHECKING:\n    import x\nfrom .y import _z\ndef f():\n    import w\n")
    assert sorted(t for t, _, _ in _imports(tree, "pkg.mod", False)) == ["pkg.y", "w"]


@pytest.mark.parametrize("package", ["orchestrator", "trainers", "evaluators"])
def test_the_plain_pytorch_layers_do_not_reach_up(package: str) -> None:
    """trainers/ and evaluators/ never import Ray, MLflow or the orchestrator; orchestrator/ never imports cli/."""
    forbidden = {"orchestrator": ("cli",), "trainers": ("ray", "mlflow", "orchestrator", "cli"),
                 "evaluators": ("ray", "mlflow", "orchestrator", "cli")}[package]
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        name = module_name(path)
        for target, _, line in _imports(ast.parse(path.read_text()), name, path.name == "__init__.py"):
            if target.split(".")[0] in forbidden:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert bad == []
