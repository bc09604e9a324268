"""The run: options, the sections one after another within the time budget, the verdict, the files, the table.

This process starts no CUDA itself: every section runs in a process of its own (`runner`), the anchor in a
subprocess.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as metadata
import importlib.util
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.gpu_check import PEAK_LIMIT_GIB, RATIO_GOAL, RATIO_STRETCH, anchor, runner, sections
from benchmarks.gpu_check.table import checks, plan_text, size_text, table, verdict_ok
from pipeline_lib import architectures
from pipeline_lib.files import write_json

FAMILY_SECTIONS = tuple(architectures.FAMILIES)
SECTIONS = (*FAMILY_SECTIONS, "anchor", "throughput")
# Seconds each section may take on a GPU (always bounded by what is left of --budget-s), and in a tiny run.
SECTION_CAP_S = {"llama": 150, "bloom": 150, "falcon": 100, "anchor": 150, "throughput": 200}
TINY_CAP_S = 180
MIN_SECTION_S = {"tiny": 10, "gpu": 30}  # a section given less is reported as skipped
# What the sections use; a missing or broken one stops the run before any section starts.
NEEDED = ("pydantic", "yaml", "datasets", "transformers", "peft", "accelerate", "bitsandbytes")
IMPORT_HERE = ("pydantic", "yaml", "datasets")  # light, and they touch no GPU
VERSIONS = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "pyarrow", "pydantic")


def log(msg: str) -> None:
    print(f"[gpu_check] {msg}", flush=True)


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for name in VERSIONS:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def environment_problems(work: Path) -> list[str]:
    """What the sections need but cannot use here, found in seconds before any section starts: the light
    packages are imported and `datasets` saves and loads a split (as the stages do) with this machine's
    pyarrow; the others are only looked up (importing bitsandbytes would start CUDA in this process)."""
    problems = []
    for name in NEEDED:
        try:
            if name in IMPORT_HERE:
                importlib.import_module(name)
            elif importlib.util.find_spec(name) is None:
                problems.append(f"{name}: not installed")
        except Exception as err:
            problems.append(f"{name}: {type(err).__name__}: {str(err)[:200]}")
    if problems:
        return problems
    try:
        from datasets import Dataset, disable_progress_bars, load_from_disk

        disable_progress_bars()
        Dataset.from_dict({"input_ids": [[1, 2, 3]], "length": [3]}).save_to_disk(str(work / "probe"))
        if load_from_disk(str(work / "probe"))["length"] != [3]:
            problems.append("datasets: a saved split did not load back")
    except Exception as err:
        problems.append(f"datasets: {type(err).__name__}: {str(err)[:200]}")
    return problems


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_check", description="Every GPU check of the QLoRA path, one table."
    )
    p.add_argument("--tiny", action="store_true", help="tiny configs on the CPU (the default without CUDA)")
    p.add_argument("--anchor", default=None, help="anchor_bench.py (default: ../shared/device/ or .devsite/)")
    p.add_argument("--no-anchor", action="store_true", help="leave the anchor out (no throughput ratios)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per training (GPU 12, tiny 3)")
    p.add_argument(
        "--warmup", type=int, default=None, help="first steps left out of the timing (GPU 3, tiny 1)"
    )
    p.add_argument(
        "--budget-s", type=float, default=None, help="time for all sections (GPU 420 s, tiny 600 s)"
    )
    p.add_argument(
        "--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}"
    )
    p.add_argument("--peak-limit-gib", type=float, default=PEAK_LIMIT_GIB)
    p.add_argument("--out", default=None, help="output folder (default $OUT, else ./gpu_check_out)")
    p.add_argument(
        "--work-dir", default=None, help="models, data and trainings (default: a temporary folder)"
    )
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    return p.parse_args(argv)


class Check:
    """One run of the check: its settings, its results (saved after every section) and its time budget."""

    def __init__(
        self, opts: argparse.Namespace, tiny: bool, only: list[str], out_dir: Path, work: Path
    ) -> None:
        self.t_start = time.time()
        self.opts, self.tiny, self.only, self.out_dir, self.work = opts, tiny, only, out_dir, work
        self.mode = "tiny" if tiny else "gpu"
        self.steps = opts.steps or (3 if tiny else 12)
        self.warmup = max(
            1, min(opts.warmup if opts.warmup is not None else (1 if tiny else 3), self.steps - 1)
        )
        self.budget = opts.budget_s or (600.0 if tiny else 420.0)
        self.deadline = self.t_start + self.budget
        self.names = sections.preset_names()
        self.results: dict[str, Any] = {
            "mode": self.mode,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": versions(),
            "library": str(Path(architectures.__file__).parent),
            "settings": {
                "steps": self.steps,
                "warmup": self.warmup,
                "cap_gib": sections.report_config("cuda").training.gpu_memory_gib,
                "peak_limit_gib": opts.peak_limit_gib,
                "budget_s": self.budget,
                "sections": only,
                "ratio_goal": RATIO_GOAL,
                "ratio_stretch": RATIO_STRETCH,
            },
            "device": {},
            "models": {},
            "throughput": None,
            "anchor": None,
        }
        self.section_opts = {
            "tiny": tiny,
            "work_dir": str(work),
            "steps": self.steps,
            "warmup": self.warmup,
            "peak_limit_gib": opts.peak_limit_gib,
        }
        self.runner: runner.Runner | None = None

    def start(self) -> None:
        """Before the first section: the environment every section and the anchor inherit."""
        os.environ.update(runner.section_env(self.tiny))
        self.runner = runner.Runner(self.tiny, self.work)

    def save(self) -> None:
        self.results["wall_s"] = round(time.time() - self.t_start, 1)
        write_json(self.out_dir / "gpu_check.json", self.results)

    def time_for(self, section: str) -> float | None:
        """Seconds the section may take, or None when too little is left to start it."""
        left = self.deadline - time.time()
        if left < MIN_SECTION_S[self.mode]:
            return None
        return min(TINY_CAP_S if self.tiny else SECTION_CAP_S[section], left)

    def run_section(self, section: str, timeout: float) -> dict[str, Any]:
        assert self.runner is not None, "start() first"
        res = self.runner.run(section, self.section_opts, timeout)
        if res.get("gpu") and not self.results["device"]:
            self.results["device"] = {"gpu": res["gpu"], "total_gib": res.get("gpu_total_gib")}
        return res

    def family(self, fam: str) -> None:
        name = self.names[fam]
        timeout = self.time_for(fam)
        if timeout is None:
            self.results["models"][fam] = {"model": name, "status": "skipped: out of time", "errors": []}
            return
        res = self.results["models"][fam] = {"model": name, **self.run_section(fam, timeout)}
        q, tr = res.get("quant") or {}, res.get("train") or {}
        log(
            f"{name}: {res['status']} in {res['section_s']} s; share_4bit {q.get('share_4bit')}, 4-bit "
            f"{size_text(q.get('footprint_gib'))}; plan {plan_text(res.get('plan'))}; peak "
            f"{size_text(res.get('peak_gib'))}; {tr.get('real_tok_s')} real tok/s; "
            f"{len(res.get('oom_events') or [])} out-of-memory halvings"
        )
        _print_problems(res)
        if fam != sections.THROUGHPUT_FAMILY:  # only llama's model serves a later section
            shutil.rmtree(self.work / f"{fam}-model", ignore_errors=True)

    def anchor(self) -> None:
        path = anchor.find_anchor(self.opts.anchor)
        timeout = self.time_for("anchor")
        if timeout is None:
            a = {"path": str(path), "found": path is not None, "status": "skipped: out of time"}
        else:
            a = anchor.run_anchor(
                path,
                self.opts.anchor or "default",
                self.work,
                timeout,
                self.steps,
                self.warmup,
                self.tiny,
                dict(os.environ),
            )
        self.results["anchor"] = a
        row = a.get("report_row") or {}
        log(f"anchor: {a['status']} ({a.get('path')}); report setup {row.get('real_tok_s')} real tok/s")
        if a.get("log_tail"):
            print(a["log_tail"], flush=True)

    def throughput(self) -> None:
        timeout = self.time_for("throughput")
        if timeout is None:
            self.results["throughput"] = {"status": "skipped: out of time", "variants": [], "errors": []}
            return
        res = self.results["throughput"] = self.run_section("throughput", timeout)
        for v in res.get("variants", []):
            rate = v.get("skipped") or v.get("error") or (v.get("train") or {}).get("real_tok_s")
            log(
                f"throughput {v['name']}: {rate} real tok/s, plan {plan_text(v.get('plan'))}, "
                f"peak {size_text(v.get('peak_gib'))}"
            )
        _print_problems(res)

    def finish(self) -> bool:
        self.results["checks"] = checks(self.results)
        self.results["ok"] = verdict_ok(self.results["checks"])
        self.save()
        _write_logs(self.work, self.out_dir)
        print(table(self.results), flush=True)
        return self.results["ok"]


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    if opts.steps is not None and opts.steps < 2:
        print("--steps must be at least 2 (one untimed, one timed)", file=sys.stderr)
        return 2
    only = [
        s.strip()
        for s in opts.only.split(",")
        if s.strip() and not (opts.no_anchor and s.strip() == "anchor")
    ]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        print(f"unknown section(s): {', '.join(unknown)}; choose from {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    tiny = opts.tiny or not _cuda_available()
    out_dir = Path(opts.out or os.environ.get("OUT") or "gpu_check_out").resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(opts.work_dir or tempfile.mkdtemp(prefix="gpu_check_")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    try:
        check = Check(opts, tiny, only, out_dir, work)
        log(
            f"mode {check.mode}, steps {check.steps} (warm-up {check.warmup}), budget {check.budget:.0f} s, "
            f"work {work}, out {out_dir}"
        )
        problems = environment_problems(work)
        if problems:
            check.results["environment_problems"] = problems
            check.save()
            for p in problems:
                log(f"cannot use {p}")
            log("nothing was run: install what is missing (benchmarks/README.md) and run again")
            return 2
        check.start()
        for fam in FAMILY_SECTIONS:
            if fam in only:
                check.family(fam)
                check.save()
        if "anchor" in only:
            check.anchor()
            check.save()
        if "throughput" in only:
            check.throughput()
            check.save()
        return 0 if check.finish() else 1
    finally:
        if not opts.keep and not opts.work_dir:
            shutil.rmtree(work, ignore_errors=True)


def _cuda_available() -> bool:
    """Whether a CUDA GPU is visible (asks the driver; starts no CUDA context in this process)."""
    from pipeline_lib import devices

    return devices.cuda_available()


def _print_problems(res: dict) -> None:
    for e in res.get("errors", []):
        log(f"  error in {e['where']}: {e['error']}")
    if res.get("status") != "ok" and res.get("log_tail"):
        print(res["log_tail"], flush=True)


def _write_logs(work: Path, out_dir: Path) -> None:
    """Every section's log in `gpu_check.log` (their last 300 lines), the anchor's rows beside it."""
    with (out_dir / "gpu_check.log").open("w") as fh:
        for section in SECTIONS:
            path = work / f"log-{section}.txt"
            if path.is_file():
                fh.write(f"===== {section} =====\n{runner.tail(path.read_text(errors='replace'), 300)}\n")
    rows = work / "anchor" / "results.jsonl"
    if rows.is_file():
        shutil.copy(rows, out_dir / "anchor_results.jsonl")
