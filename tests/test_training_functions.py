"""The trainer stays a loop over named pieces: no function in ``nonlocal_opt/training`` is longer than
``MAX_LINES`` lines (measured with ``ast``, from ``def`` to the last line of the body)."""

from __future__ import annotations

import ast
from pathlib import Path

MAX_LINES = 100
TRAINING = Path(__file__).resolve().parents[1] / "nonlocal_opt" / "training"


def function_lengths(path: Path) -> dict[str, int]:
    """``{"file.py:qualified.name": lines}`` for every function and method in ``path``, nested ones too."""
    lengths: dict[str, int] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = prefix
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}."
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lengths[f"{path.name}:{name[:-1]}"] = child.end_lineno - child.lineno + 1
            visit(child, name)

    visit(ast.parse(path.read_text()), "")
    return lengths


def test_function_lengths_measure_from_def_to_the_last_line(tmp_path):
    source = tmp_path / "sample.py"
    source.write_text("class A:\n    def f(self):\n        def g():\n            return 1\n\n        return g\n")
    assert function_lengths(source) == {"sample.py:A.f": 5, "sample.py:A.f.g": 2}


def test_no_function_in_training_is_longer_than_100_lines():
    lengths = {name: n for path in sorted(TRAINING.glob("*.py")) for name, n in function_lengths(path).items()}
    assert lengths, f"no functions found under {TRAINING}"
    too_long = {name: n for name, n in lengths.items() if n > MAX_LINES}
    assert not too_long, f"split these into named pieces (at most {MAX_LINES} lines each): {too_long}"
