"""The library never imports Prefect; tasks stay thin."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_library_does_not_import_prefect():
    modules = [p.stem for p in (ROOT / "pipeline_lib").glob("*.py") if p.stem != "__init__"]
    code = (
        "import sys\n"
        + "".join(f"import pipeline_lib.{m}\n" for m in modules)
        + (
            "bad = [m for m in sys.modules if m == 'prefect' or m.startswith('prefect.')]\n"
            "assert not bad, bad\n"
        )
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_no_python_package_named_mlflow_in_the_project():
    assert not (ROOT / "mlflow" / "__init__.py").exists()
    assert not list((ROOT / "mlflow").glob("*.py"))


def test_tasks_are_thin():
    tree = ast.parse((ROOT / "tasks" / "stages.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and any(
            isinstance(d, ast.Call) and getattr(d.func, "id", "") == "task" for d in node.decorator_list
        ):
            body_lines = node.end_lineno - node.body[0].lineno + 1
            assert body_lines <= 25, f"task {node.name} is {body_lines} lines"
