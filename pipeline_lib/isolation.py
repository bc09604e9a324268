"""Run one stage in a fresh Python process, so that its memory (GPU memory above all) is surely released
when it ends.

`call(stage, job)` takes the stage function itself (`<stage>_stage(job: Job) -> Result`, both pydantic
models): the job crosses the boundary as JSON and is validated against the function's annotation in the
child, the result comes back as JSON and is validated against its return annotation. An error in the child
comes back as a `StageError` carrying the child's one-line message.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
import traceback
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel


class StageError(RuntimeError):
    """A stage failed in its own process; str() is the child's one-line message."""

    def __init__(self, message: str, kind: str = "", log_tail: str = "") -> None:
        super().__init__(message)
        self.kind = kind
        self.log_tail = log_tail


def wanted(setting: bool | str, device: str) -> bool:
    """Whether a stage runs in a process of its own: `RunConfig.process_isolation` for `device`
    ('auto' = only where the stage uses a CUDA GPU)."""
    if setting == "auto":
        from pipeline_lib.devices import resolve_device

        return resolve_device(device) == "cuda"
    return bool(setting)


def _types(fn: Callable) -> tuple[type[BaseModel], type[BaseModel]]:
    hints = typing.get_type_hints(fn)
    (job_name,) = [n for n in hints if n != "return"][:1] or ["job"]
    return hints[job_name], hints["return"]


def _target(fn: Callable) -> str:
    return f"{fn.__module__}:{fn.__qualname__}"


def _resolve(target: str) -> Callable:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def call(
    stage: Callable[[Any], BaseModel],
    job: BaseModel,
    *,
    isolate: bool = True,
    log_path: str | Path | None = None,
    label: str = "",
) -> Any:
    """`stage(job)`, in a child process when `isolate` (the default). `label` (e.g. "train llama-3b")
    prefixes the error message; the child's output goes to `log_path`."""
    if not isolate:
        return stage(job)
    _, result_type = _types(stage)
    prefix = f"{label}: " if label else ""
    with tempfile.TemporaryDirectory(prefix="qabot-stage-") as tmp:
        arg_file, out_file = Path(tmp, "args.json"), Path(tmp, "result.json")
        arg_file.write_text(json.dumps({"target": _target(stage), "job": job.model_dump(mode="json")}))
        log = Path(log_path) if log_path else Path(tmp, "stage.log")
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as fh:
            proc = subprocess.run(
                [sys.executable, "-m", "pipeline_lib.isolation", str(arg_file), str(out_file)],
                stdout=fh,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        tail = log.read_text(errors="replace")[-4000:] if log.exists() else ""
        if out_file.exists():
            res = json.loads(out_file.read_text())
            if "error" in res:
                raise StageError(prefix + res["error"]["message"], res["error"]["type"], tail)
            if proc.returncode == 0:
                return result_type.model_validate(res["result"])
        raise StageError(
            f"{prefix}{_target(stage)} ended with exit code {proc.returncode} before returning a result (log: {log})",
            "",
            tail,
        )


def _main(arg_file: str, out_file: str) -> int:
    spec = json.loads(Path(arg_file).read_text())
    try:
        stage = _resolve(spec["target"])
        job_type, _ = _types(stage)
        result = stage(job_type.model_validate(spec["job"]))
        Path(out_file).write_text(json.dumps({"result": result.model_dump(mode="json")}))
        return 0
    except BaseException as err:  # report every failure, the child exits right after
        traceback.print_exc()
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        Path(out_file).write_text(json.dumps({"error": {"type": type(err).__name__, "message": msg}}))
        return 1


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1], sys.argv[2]))
