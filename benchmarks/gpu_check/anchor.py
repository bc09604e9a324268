"""The anchor: `anchor_bench.py` (the shared baseline, plain transformers + peft + bitsandbytes as the report
ran it) in a subprocess, stopped as soon as it has printed its "report's setup" row. Machines differ from
call to call, so throughput is only reported as a ratio against this row measured in the same call.

Its rows are JSON lines (`{"what": "versions" | "train" | "error", ...}`); it adds 3 warm-up steps of its
own and runs the llama-3b config (`SCALE=tiny`: a small one on the CPU).
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.gpu_check import ROOT

REPORT_VARIANT = "report_bs4_pad_gc"  # batch 4, padded to the longest row, gradient checkpointing
CANDIDATES = (
    ROOT.parent / "shared" / "device" / "anchor_bench.py",  # beside the checkout (not on the GPU machine)
    ROOT / "shared" / "device" / "anchor_bench.py",
    ROOT / ".devsite" / "anchor_bench.py",  # what travels to the GPU machine
)


def find_anchor(given: str | None) -> Path | None:
    if given:
        p = Path(given)
        if not p.is_absolute() and not p.exists():
            p = ROOT / given
        return p if p.is_file() else None
    return next((p for p in CANDIDATES if p.is_file()), None)


def run_anchor(
    path: Path | None,
    given: str,
    work: Path,
    timeout: float,
    steps: int,
    warmup: int,
    tiny: bool,
    env: dict[str, str],
) -> dict[str, Any]:
    """Run the anchor until its report row (or an error row for it, its end, or `timeout`); its output goes to
    `work/log-anchor.txt`, its rows to `work/anchor/results.jsonl`."""
    res: dict[str, Any] = {"path": str(path) if path else given, "found": path is not None, "rows": []}
    if path is None:
        res["status"] = "not found"
        return res
    out = work / "anchor"
    out.mkdir(parents=True, exist_ok=True)
    timed = max(3, steps - warmup)  # as many timed steps as the sections, at least 3
    run_env = {**env, "OUT": str(out), "STEPS": str(timed)}
    if tiny:
        run_env["SCALE"] = "tiny"
    res["steps"] = timed
    t = time.time()
    proc = subprocess.Popen(
        [sys.executable, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=run_env,
        cwd=str(out),
        text=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    text: list[str] = []
    res["status"] = "ended without the report's-setup row"
    deadline = t + timeout
    while True:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.time()))
        except queue.Empty:
            res["status"] = f"timed out after {timeout:.0f} s"
            break
        if line is None:
            break
        text.append(line)
        row = _row(line)
        if row is None:
            continue
        res["rows"].append(row)
        if row.get("what") == "versions":
            res["gpu"] = row.get("gpu")
        if row.get("what") == "train" and row.get("variant") == REPORT_VARIANT:
            res["report_row"] = row
            res["status"] = "ok"
            break
        if row.get("what") == "error" and row.get("where") in (REPORT_VARIANT, "llama-3b"):
            res["status"] = f"anchor error: {str(row.get('err'))[:300]}"
            break
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    (work / "log-anchor.txt").write_text("".join(text))
    res["section_s"] = round(time.time() - t, 1)
    if res["status"] != "ok":
        res["log_tail"] = "".join(text[-25:]).rstrip()
    return res


def _row(line: str) -> dict[str, Any] | None:
    if not line.startswith("{"):
        return None
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) else None
