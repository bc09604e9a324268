"""A section in a process of its own (`sections.child_main`), bounded by a time limit.

On a GPU every section is a fresh interpreter (`spawn`): nothing of CUDA is inherited, its memory is the
process's own and goes back when it ends. (A fork server would have to import peft, which imports
bitsandbytes, which asks the GPU about itself on import; CUDA does not survive a fork.) In a tiny run (CPU,
CUDA hidden) the sections are forked from a fork server that has imported torch, transformers, peft and the
library once (`sections.PRELOAD`), which turns a minute of imports into seconds; the section code and what
comes back are the same either way.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.gpu_check import ROOT, sections
from pipeline_lib.files import read_json

STOP_GRACE_S = 15


def tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def section_env(tiny: bool) -> dict[str, str]:
    """The environment of every section and of the anchor: unbuffered, offline, this checkout first on the
    path; in a tiny run CUDA hidden and one CPU thread (tiny matrices gain nothing from more, and on a busy
    machine spinning OpenMP threads make each step several times slower)."""
    env = {
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
    }
    if tiny:
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    return env


class Runner:
    """Runs sections one after another; each one's log is `work/log-SECTION.txt`, its results
    `work/part-SECTION.json`."""

    def __init__(self, tiny: bool, work: Path) -> None:
        """Start sections after `os.environ.update(section_env(tiny))`: they inherit this environment."""
        self.work = work
        if tiny:
            self.ctx = multiprocessing.get_context("forkserver")
            self.ctx.set_forkserver_preload(list(sections.PRELOAD))
        else:
            self.ctx = multiprocessing.get_context("spawn")

    def log_path(self, section: str) -> Path:
        return self.work / f"log-{section}.txt"

    def run(
        self, section: str, opts: dict[str, Any], timeout: float, target: Callable = sections.child_main
    ) -> dict[str, Any]:
        """`target(section, opts, part, log)` in a process of its own: the results it left in `part` with
        `status` ("ok", "exit code N", "timed out after S s"), `section_s` and, when something went wrong,
        the end of its log."""
        part = self.work / f"part-{section}.json"
        log = self.log_path(section)
        part.unlink(missing_ok=True)
        opts = {**opts, "deadline": time.time() + timeout}
        t = time.time()
        proc = self.ctx.Process(
            target=target, args=(section, opts, str(part), str(log)), name=f"gpu_check-{section}"
        )
        proc.start()
        proc.join(timeout)
        if proc.is_alive():
            status = f"timed out after {timeout:.0f} s"
            proc.terminate()
            proc.join(STOP_GRACE_S)
            if proc.is_alive():
                proc.kill()
                proc.join()
        else:
            status = "ok" if proc.exitcode == 0 else f"exit code {proc.exitcode}"
        res = read_json(part) or {"section": section, "errors": []}
        res["status"] = status
        res["section_s"] = round(time.time() - t, 1)
        if status != "ok" or res.get("errors"):
            res["log_tail"] = tail(log.read_text(errors="replace") if log.is_file() else "")
        return res
