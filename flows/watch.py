"""Follow a flow run from the terminal: each stage as it finishes, the training progress, then a summary.

`qabot demo` submits the deployment's run, prints its URL at once and then calls `watch`, which polls the
Prefect API every `interval` seconds (the task runs of the flow run and its progress artifact) — the same
records the Prefect UI shows. `summarize` turns the run's scoreboard into the closing lines.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
BAR = 24


def progress_bar(percent: float, note: str | None = None) -> str:
    """`training [#########---------------]  38%  llama-tiny: 76% of its steps`"""
    p = max(0.0, min(100.0, percent))
    filled = round(BAR * p / 100)
    return f"  training [{'#' * filled}{'-' * (BAR - filled)}] {p:3.0f}%" + (f"  {note}" if note else "")


def stage_line(name: str, state: str, seconds: float | None) -> str:
    """`  ✓ train                Completed       14.2 s` (a cached stage says so)."""
    mark = "✓" if state in ("Completed", "Cached") else "✗"
    took = f"{seconds:7.1f} s" if seconds is not None else ""
    return f"  {mark} {name:<22} {state:<10} {took}".rstrip()


def watch(
    flow_run_id: str,
    *,
    timeout: float | None = None,
    interval: float = 2.0,
    out: Callable[[str], None] = print,
) -> Any:
    """Poll the flow run until it ends (or `timeout` seconds pass); print each finished task run once and the
    training progress whenever it moves by a whole percent. Returns the flow run as last read."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, FlowRunFilter

    seen: set[str] = set()
    last_progress: tuple[int, str | None] | None = None
    t0 = time.monotonic()
    with get_client(sync_client=True) as client:
        while True:
            fr = client.read_flow_run(flow_run_id)
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [flow_run_id]}))
            for tr in sorted(runs, key=lambda r: r.end_time or r.expected_start_time or 0):
                if tr.state and tr.state.type.value in TERMINAL and str(tr.id) not in seen:
                    seen.add(str(tr.id))
                    name = tr.name.rsplit("-", 1)[0]
                    out(stage_line(name, tr.state.name, tr.total_run_time.total_seconds() or None))
            for art in client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    flow_run_id={"any_": [flow_run_id]}, type={"any_": ["progress"]}
                )
            ):
                try:
                    now = (int(float(art.data)), art.description)
                except (TypeError, ValueError):
                    continue
                if now != last_progress and (last_progress is None or now[0] != last_progress[0]):
                    out(progress_bar(now[0], art.description))
                    last_progress = now
            if fr.state and fr.state.type.value in TERMINAL:
                return fr
            if timeout is not None and time.monotonic() - t0 > timeout:
                return fr
            time.sleep(interval)


def summarize(report_dir: str | Path) -> list[str]:
    """Per model: training time, held-out bits per byte and question score before → after, and the best
    model by the report's rule (from the run's `scoreboard.csv` and `report.md`)."""
    report_dir = Path(report_dir)
    board = report_dir / "scoreboard.csv"
    if not board.is_file():
        return [f"(no scoreboard in {report_dir})"]
    with board.open() as f:
        rows = list(csv.DictReader(f))
    lines = [f"  {'model':<16} {'train':>8}  {'held-out bits/byte':>20}  {'question score':>16}"]
    for r in rows:
        lines.append(
            f"  {r['model']:<16} {_num(r.get('train_time_s'), '.0f'):>6} s  "
            f"{_num(r.get('bits_per_byte_before'), '.3f'):>8} → {_num(r.get('bits_per_byte'), '.3f'):<8}  "
            f"{_num(r.get('question_score_before'), '.2f'):>6} → {_num(r.get('question_score'), '.2f'):<6}"
        )
    report = report_dir / "report.md"
    if report.is_file():
        best = next((x for x in report.read_text().splitlines() if x.startswith("Best model:")), None)
        if best:
            lines.append("  " + best.split(" — ")[0].replace("**", ""))
    return lines


def _num(value: str | None, fmt: str) -> str:
    try:
        return format(float(value), fmt)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "–"
