"""The benchmarks run without the tests: nothing under benchmarks/ imports the ``tests`` package."""

from __future__ import annotations

import ast
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _imported(path: Path) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            modules.add(node.module)
    return modules


def test_no_benchmark_imports_the_tests() -> None:
    scripts = sorted(BENCHMARKS.glob("*.py"))
    assert scripts, f"no benchmark found in {BENCHMARKS}"
    offenders = {
        path.name: sorted(m for m in _imported(path) if m == "tests" or m.startswith("tests.")) for path in scripts
    }
    assert {name: found for name, found in offenders.items() if found} == {}
