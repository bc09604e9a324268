"""A Prefect progress artifact that moves while models train.

The training stage writes its step to `progress.json` in its output directory (in whatever process it runs);
the train task runs the stage in a background thread and, from the task's own thread (where Prefect's run
context is), turns that file into the artifact's percentage: model k of n covers [k/n, (k+1)/n).
"""

from __future__ import annotations

import contextvars
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from uuid import UUID

from pydantic import BaseModel, ConfigDict

T = TypeVar("T")


class ProgressSpan(BaseModel):
    """Where one model's training sits in the run's progress artifact."""

    model_config = ConfigDict(frozen=True)

    artifact_id: str | None  # None: no artifact (outside a flow run)
    start: float  # percent at the start of this model
    share: float  # percent this model's training covers


def _fraction(progress_file: Path) -> float | None:
    try:
        p = json.loads(progress_file.read_text())
        return min(1.0, p["step"] / p["max_steps"]) if p.get("max_steps") else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def update(span: ProgressSpan | None, fraction: float, note: str | None = None) -> None:
    if span is None or span.artifact_id is None:
        return
    from prefect.artifacts import update_progress_artifact

    try:
        update_progress_artifact(UUID(span.artifact_id), span.start + span.share * fraction, description=note)
    except Exception:  # progress is a courtesy: never fail the work because the artifact could not move
        pass


def run_reporting(work: Callable[[], T], progress_file: Path, span: ProgressSpan | None, label: str) -> T:
    """`work()` in a background thread; meanwhile the artifact follows `progress_file` every 2 s."""
    result: dict[str, object] = {}

    def target() -> None:
        try:
            result["value"] = work()
        except BaseException as err:  # re-raised in the caller's thread
            result["error"] = err

    # the stage's thread sees this thread's context (Prefect's run context: its prints are logged like the
    # task's own, not written to stdout)
    context = contextvars.copy_context()
    thread = threading.Thread(target=context.run, args=(target,), name=f"stage-{label}", daemon=True)
    thread.start()
    last = None
    while thread.is_alive():
        thread.join(timeout=2.0)
        frac = _fraction(progress_file)
        if frac is not None and frac != last:
            update(span, frac, f"{label}: {frac:.0%} of its steps")
            last = frac
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    update(span, 1.0, f"{label}: trained")
    return result["value"]  # type: ignore[return-value]
