"""The house rules: the library never imports Prefect, has no import cycles, imports MLflow in two modules
only, keeps its modules small; tasks stay thin; every stage has the same shape."""

from __future__ import annotations

import ast
import importlib
import inspect
import subprocess
import sys
import typing
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LIB = ROOT / "pipeline_lib"
MLFLOW_HOMES = {"pipeline_lib.tracking", "pipeline_lib.serving"}
MAX_LINES = 500
STAGES = {  # module: stage function
    "pipeline_lib.tokenization": "tokenize_stage",
    "pipeline_lib.training": "train_stage",
    "pipeline_lib.merge": "merge_stage",
    "pipeline_lib.inference": "answer_stage",
    "pipeline_lib.compare": "compare_stage",
    "pipeline_lib.promotion": "promote_stage",
}


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(LIB.rglob("*.py")):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every import in a file, at any depth, except under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            skip.update(id(n) for b in node.body for n in ast.walk(b))
    out = []
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            out.append((base, [a.name for a in node.names]))
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        for target, names in _imports(path):
            if not target.startswith("pipeline_lib"):
                continue
            hits = [f"{target}.{n}" for n in names if f"{target}.{n}" in mods]  # `from pkg import submodule`
            if len(hits) < len(names) or not names:
                hits.append(target)  # names defined in the module (or package __init__) itself
            graph[mod].update(h for h in hits if h in mods and h != mod)
    return graph


def test_library_does_not_import_prefect():
    """No library module names Prefect in an import at any depth (inside functions too), nor as a module
    name handed to importlib: the library runs where Prefect is not installed (the GPU check's machine).
    Read from the source, not by importing everything (which costs ~25 s of test time)."""
    bad = []
    for mod, path in _modules().items():
        tree = ast.parse(path.read_text())
        names = [t for t, _ in _imports(path)]
        names += [
            node.args[0].value
            for node in ast.walk(tree)
            if isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ]
        bad += [(mod, n) for n in names if n == "prefect" or n.startswith("prefect.")]
    assert not bad, bad


def test_the_no_prefect_rule_sees_imports_inside_functions(tmp_path, monkeypatch):
    """The source check itself: a lazy import or an importlib call naming Prefect is found."""
    fake = tmp_path / "pipeline_lib"
    fake.mkdir()
    (fake / "sneaky.py").write_text("def f():\n    import prefect.flows\n")
    (fake / "dyn.py").write_text("import importlib\nimportlib.import_module('prefect')\n")
    monkeypatch.setattr(sys.modules[__name__], "LIB", fake)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    with pytest.raises(
        AssertionError, match=r"\(.pipeline_lib.dyn., .prefect.\), \(.pipeline_lib.sneaky., .prefect.flows.\)"
    ):
        test_library_does_not_import_prefect()


def test_the_flow_module_imports_without_torch():
    """Registering deployments (`prefect deploy` imports the flow) and a cached rerun never pay for torch,
    transformers, peft or bitsandbytes: they load when a stage first runs."""
    code = (
        "import sys\nimport flows.finetune_compare\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'peft', 'bitsandbytes'}))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", (proc.stdout, proc.stderr[-2000:])


def test_no_import_cycles_in_the_library():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = stack[stack.index(n) :] + [n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_cycle_check_sees_a_cycle(tmp_path, monkeypatch):
    """The check above finds a cycle through an import inside a function."""
    pkg = tmp_path / "pipeline_lib"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pipeline_lib import b\n")
    (pkg / "b.py").write_text("def f():\n    from pipeline_lib.a import x\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "LIB", pkg)
    with pytest.raises(pytest.fail.Exception, match="import cycle"):
        test_no_import_cycles_in_the_library()


def test_mlflow_is_imported_only_behind_the_tracking_seam():
    offenders = []
    for mod, path in list(_modules().items()) + [
        (f"{p.parent.name}.{p.stem}", p) for d in ("tasks", "flows") for p in (ROOT / d).glob("*.py")
    ]:
        if mod in MLFLOW_HOMES:
            continue
        if any(t == "mlflow" or t.startswith("mlflow.") for t, _ in _imports(path)):
            offenders.append(mod)
    assert not offenders, f"MLflow imported outside {sorted(MLFLOW_HOMES)}: {offenders}"


def test_library_modules_are_small():
    big = {}
    for mod, path in _modules().items():
        lines = len(path.read_text().splitlines())
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if lines > MAX_LINES and "lines" not in doc:  # a bigger module says why in its docstring
            big[mod] = lines
    assert not big, big


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


@pytest.mark.parametrize("module", sorted(STAGES))
def test_every_stage_has_one_shape(module):
    """`<stage>_stage(job: Job) -> Result`: one typed job in, one typed record out."""
    from pydantic import BaseModel

    from pipeline_lib.contracts import Record

    fn = getattr(importlib.import_module(module), STAGES[module])
    hints = typing.get_type_hints(fn)
    params = list(inspect.signature(fn).parameters)
    assert params[0] == "job" and issubclass(hints["job"], BaseModel)
    assert issubclass(hints["return"], Record), hints["return"]
