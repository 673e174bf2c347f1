"""The shape the serving seams promise, checked on the source: no dicts across the engine boundary, no imports
back up into training, short functions on the serving path."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.helpers import REPO

PACKAGE = REPO / "expertserve"
MAX_STATEMENTS = 40


def _modules(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (PACKAGE / folder).rglob("*.py"))


def _statements(func: ast.AST) -> int:
    """Statements in a function's body, nested blocks included; a nested function counts as one (its body counts
    on its own)."""
    count = 0
    stack = list(getattr(func, "body", []))
    while stack:
        node = stack.pop()
        if isinstance(node, ast.stmt):
            count += 1
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            stack.extend(ast.iter_child_nodes(node))
    return count


def test_no_dict_is_indexed_as_a_request_on_the_serving_path() -> None:
    pattern = re.compile(r"request\[[\"']")
    hits = [
        f"{p.relative_to(REPO)}:{i}"
        for p in _modules("serve", "engine")
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert hits == []


def test_serving_evaluation_and_engine_never_import_training() -> None:
    hits = []
    for path in _modules("serve", "eval", "engine"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else ([node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            )
            hits += [f"{path.relative_to(REPO)}: {n}" for n in names if n.startswith("expertserve.train")]
    assert hits == []


SHAPED = ("serve", "train", "eval", "bench", "cli")
MAX_CLASS_LINES = 350
MAX_INGRESS_LINES = 300


def test_no_function_in_serve_train_eval_bench_or_cli_has_more_than_40_statements() -> None:
    long = []
    for path in _modules(*SHAPED):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
                and _statements(node) > MAX_STATEMENTS
            ):
                long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({_statements(node)})")
    assert long == []


def test_no_class_in_the_package_is_over_350_lines() -> None:
    big = [
        f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path in sorted(PACKAGE.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ClassDef) and (node.end_lineno or 0) - node.lineno + 1 > MAX_CLASS_LINES
    ]
    assert big == []


def test_the_ingress_declares_routes_and_wires_its_rooms_in_under_300_lines() -> None:
    lines = len((PACKAGE / "serve" / "ingress.py").read_text().splitlines())
    assert lines < MAX_INGRESS_LINES, lines


def test_the_statement_counter_counts_nested_blocks() -> None:
    func = ast.parse(
        "def f():\n    x = 1\n    if x:\n        y = 2\n        for i in []:\n            pass\n"
        "    def g():\n        z = 3\n"
    ).body[0]
    assert _statements(func) == 6  # x=, if, y=, for, pass, def g (not its body)
