"""The package's shape: no import cycle, arrows pointing inward (../shared/DESIGN.md's rings)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "bamcountd"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _imports(name: str) -> Iterator[str]:
    """Every module ``name`` imports, at any depth of its code (a function's lazy import too),
    TYPE_CHECKING blocks included: a cycle there is still a knot in the design."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:  # `from bamcountd import logs` imports the module bamcountd.logs
                yield f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base


def _graph() -> dict[str, set[str]]:
    return {name: {target for target in _imports(name) if target in MODULES and target != name} for name in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_in_the_package() -> None:
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_one() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _reaches(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    pending = [start]
    while pending:
        for target in graph[pending.pop()]:
            if target not in seen:
                seen.add(target)
                pending.append(target)
    return seen


def test_arrows_point_inward() -> None:
    graph = _graph()
    runners = [name for name in MODULES if name.startswith(("bamcountd.service", "bamcountd.dnanexus"))]
    for name in runners:  # argparse ends in the CLI
        assert "bamcountd.cli" not in _reaches(graph, name), name
        assert "argparse" not in set(_imports(name)), name
    core = [name for name in MODULES if name not in runners and name not in ("bamcountd.cli", "bamcountd.__main__")]
    for name in core:
        outer = {target for target in _reaches(graph, name) if target in runners or target == "bamcountd.cli"}
        assert not outer, (name, outer)
    service = [name for name in runners if name.startswith("bamcountd.service")]
    for name in service:  # the two runners share the inner rings, not each other
        assert not {t for t in graph[name] if t.startswith("bamcountd.dnanexus")}, name
