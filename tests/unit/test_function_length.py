"""Every function of ``ffsd_fast`` fits on one screen: at most 60 lines, its signature and docstring included."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "ffsd_fast"
LIMIT = 60


def test_no_function_is_longer_than_a_screen():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > LIMIT:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long
