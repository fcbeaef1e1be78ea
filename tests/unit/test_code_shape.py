"""No function in worker/ longer than 60 lines or above cyclomatic complexity 15 (radon rank C
or better): past that, a function does more than one job."""

import ast
from pathlib import Path

from radon.complexity import cc_visit

WORKER = Path(__file__).parents[2] / "worker"
MAX_LINES = 60
MAX_COMPLEXITY = 15


def sources() -> list[Path]:
    return sorted(WORKER.rglob("*.py"))


def test_no_function_is_longer_than_60_lines() -> None:
    long = [
        f"{path.relative_to(WORKER.parent)}:{node.lineno} {node.name} ({length} lines)"
        for path in sources()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        if (length := (node.end_lineno or node.lineno) - node.lineno + 1) > MAX_LINES
    ]
    assert long == []


def test_no_function_is_above_complexity_15() -> None:
    tangled = [
        f"{path.relative_to(WORKER.parent)}:{block.lineno} {block.fullname} ({block.complexity})"
        for path in sources()
        for block in cc_visit(path.read_text())
        if block.complexity > MAX_COMPLEXITY
    ]
    assert tangled == []
