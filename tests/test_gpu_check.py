"""benchmarks/gpu_check.py: its table and anchor handling, the CPU tiny run end to end, the full run on a GPU."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
KEYS = {"mode", "versions", "settings", "device", "models", "throughput", "anchor", "checks", "ok", "wall_s"}


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(args: list[str], out: Path, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(out)}
    env.pop("STEPS", None)
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=ROOT,
    )


def _gpu_results() -> dict:
    """What a GPU run writes, with one of each outcome: fits, out-of-memory retries, a failed section."""
    plan = {"micro_batch": 1, "grad_accum": 4, "gradient_checkpointing": True, "tokens_per_micro_batch": 512}
    model = {
        "status": "ok",
        "errors": [],
        "batch_size": 4,
        "quant": {"share_4bit": 1.0, "footprint_gib": 1.88, "bf16_gib": 6.38},
        "plan": plan,
        "initial_plan": {**plan, "micro_batch": 2, "grad_accum": 2, "estimate_gib": 6.12},
        "train": {"real_tok_s": 1234.5, "padding_share": 0.08},
        "peak_gib": 5.1,
        "peak_ok": True,
        "oom_events": [{"error": "OutOfMemoryError"}],
    }
    bloom = {**model, "peak_gib": 7.9, "peak_ok": False, "oom_events": []}
    falcon = {"status": "exit code 1", "errors": [{"where": "falcon", "error": "RuntimeError: boom"}]}
    variant = {"name": "grouped_gc", "rows_per_step": 64, "tokens_per_micro_batch": 16384, "packing": False}
    return {
        "mode": "gpu",
        "versions": {"torch": "2.11", "transformers": "5.17", "peft": "0.21", "bitsandbytes": "0.50.2"},
        "settings": {"steps": 12, "warmup": 3, "cap_gib": 8.0, "peak_limit_gib": 7.5},
        "device": {"gpu": "NVIDIA H200", "total_gib": 139.8},
        "wall_s": 321.0,
        "models": {"llama": model, "bloom": bloom, "falcon": falcon},
        "anchor": {
            "found": True,
            "status": "ok",
            "report_row": {"real_tok_s": 1650.0, "peak_gib": 4.0, "pad_frac": 0.32},
        },
        "throughput": {
            "status": "ok",
            "best": "grouped_gc",
            "variants": [
                {
                    **variant,
                    "plan": {**plan, "micro_batch": 64, "tokens_per_micro_batch": 16384, "grad_accum": 1},
                    "real_tok_s": 9900.0,
                    "train_peak_gib": 30.2,
                    "padding_share": 0.09,
                },
                {**variant, "name": "packed_gc_bf16", "packing": True, "skipped": "out of time"},
                {
                    **variant,
                    "name": "grouped_bf16",
                    "error": "RuntimeError: out of memory even at micro-batch 1",
                },
            ],
        },  # fmt: skip
        "checks": {
            "all_4bit": True,
            "peaks_ok": False,
            "peak_limit_gib": 7.5,
            "best_ratio": 6.0,
            "failed": ["falcon"],
        },
    }


def test_table_of_a_gpu_run(gpu_check):
    text = gpu_check.table(_gpu_results())
    lines = text.splitlines()
    assert lines[0].startswith("== gpu_check (gpu) on NVIDIA H200 140 GiB")
    llama = next(line for line in lines if line.startswith("llama-3b"))
    assert "1.000" in llama and "1.88" in llama and "1x4 gc" in llama and "6.12" in llama and "1,234" in llama
    assert "1 OOM->halved" in llama
    assert "PEAK > 7.5 GiB" in next(line for line in lines if line.startswith("bloom-3b"))
    assert "RuntimeError: boom" in next(line for line in lines if line.startswith("falcon-1b"))
    assert "cap 8.0 GiB" in text
    grouped = next(line for line in lines if "grouped_gc:" in line)
    assert "9,900" in grouped and "6.00" in grouped and "<- best" in grouped
    assert "out of time" in text and "out of memory even at micro-batch 1" in text
    assert lines[-1].startswith(
        "verdict: 4-bit everywhere: yes; peaks <= 7.5 GiB: NO; best/anchor: 6.00x (goal 4x met)"
    )
    assert lines[-1].endswith("sections failed: falcon")


def test_table_without_anchor(gpu_check):
    results = _gpu_results()
    results["anchor"] = {"found": False, "path": "/nowhere/anchor_bench.py", "status": "not found"}
    results["checks"]["best_ratio"] = None
    text = gpu_check.table(results)
    assert "anchor not found (/nowhere/anchor_bench.py): ratio skipped" in text
    assert "best/anchor: n/a" in text


def test_anchor_is_stopped_after_the_report_row(gpu_check, tmp_path):
    fake = tmp_path / "anchor_bench.py"
    fake.write_text(
        textwrap.dedent(
            """
            import json, os, time
            print(json.dumps({"what": "versions", "gpu": "cpu"}), flush=True)
            print("a warning line", flush=True)
            print(json.dumps({"what": "train", "variant": "report_bs4_pad_gc", "real_tok_s": 12.5,
                              "steps": int(os.environ["STEPS"])}), flush=True)
            time.sleep(60)
            """
        )
    )
    opts = SimpleNamespace(tiny=True, steps=12, warmup=3)
    t = time.time()
    res = gpu_check.run_anchor(fake, opts, tmp_path, {}, timeout=50, given=str(fake))
    assert time.time() - t < 30
    assert res["status"] == "ok" and res["report_row"]["real_tok_s"] == 12.5
    assert res["report_row"]["steps"] == 9 and res["gpu"] == "cpu"
    missing = gpu_check.run_anchor(None, opts, tmp_path, {}, timeout=5, given="../nowhere.py")
    assert missing == {"path": "../nowhere.py", "found": False, "rows": [], "status": "not found"}
    assert gpu_check.find_anchor(str(tmp_path / "absent.py")) is None
    assert gpu_check.find_anchor(str(fake)) == fake


@pytest.mark.slow
def test_tiny_run_end_to_end(tmp_path, gpu_check):
    """The whole script on the CPU with tiny configs of the three architectures (1.5-4 minutes on 2 cores).
    The anchor is the shared baseline script beside the project; where a checkout has none, every other
    section still runs and is checked."""
    has_anchor = gpu_check.find_anchor(None) is not None
    args = ["--tiny"] if has_anchor else ["--tiny", "--only", "llama,bloom,falcon,throughput"]
    proc = _run(args, tmp_path, timeout=900)
    out = proc.stdout
    assert proc.returncode == 0, out[-5000:] + proc.stderr[-3000:]
    assert "== gpu_check (tiny) on cpu" in out
    assert "verdict: 4-bit everywhere: yes" in out and "sections failed: none" in out
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert KEYS <= set(data)
    assert data["mode"] == "tiny" and data["ok"] is True
    for arch, name in (("llama", "llama-3b"), ("bloom", "bloom-3b"), ("falcon", "falcon-1b")):
        m = data["models"][arch]
        assert m["status"] == "ok" and not m["errors"]
        assert m["quant"]["share_4bit"] == 1.0 and m["quant"]["linear_kinds"] == ["Linear4bit"]
        assert m["train"]["real_tok_s"] > 0 and m["train"]["steps_timed"] >= 1
        assert data["checks"]["share_4bit"][name] == 1.0
        assert name in out
    assert data["checks"]["all_4bit"] is True and data["checks"]["peaks_ok"] is None
    if has_anchor:
        assert data["anchor"]["status"] == "ok" and data["anchor"]["report_row"]["real_tok_s"] > 0
    variants = {v["name"]: v for v in data["throughput"]["variants"]}
    assert {"grouped_gc", "grouped_gc_bf16", "packed_gc_bf16", "grouped_bf16"} == set(variants)
    assert all(v.get("real_tok_s", 0) > 0 for v in variants.values()), variants
    assert variants["packed_gc_bf16"]["padding_share"] == 0.0
    assert (tmp_path / "gpu_check.log").is_file()
    if has_anchor:
        assert data["checks"]["best_ratio"] > 0 and (tmp_path / "anchor_results.jsonl").is_file()


@pytest.mark.gpu
def test_full_gpu_check(tmp_path):
    """Every GPU check (about 5-7 minutes on an H100/H200): all linear layers 4-bit, peaks under the cap."""
    proc = _run([], tmp_path, timeout=900)
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert data["mode"] == "gpu"
    assert data["checks"]["all_4bit"] is True, data["checks"]
    assert data["checks"]["peaks_ok"] is True, data["checks"]
    assert not data["checks"]["failed"], proc.stdout[-5000:]
    assert proc.returncode == 0
