"""benchmarks/gpu_check: its table and verdict, its sections' processes, the anchor handling, its imports, the
CPU tiny run end to end, and the full run on a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.gpu_check import anchor, models, runner, table  # noqa: E402
from pipeline_lib.files import write_json  # noqa: E402

KEYS = {
    "mode",
    "versions",
    "library",
    "settings",
    "device",
    "models",
    "throughput",
    "anchor",
    "checks",
    "ok",
    "wall_s",
}


def _run(args: list[str], out: Path, timeout: float, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "OUT": str(out), **env},
        timeout=timeout,
        cwd=ROOT,
    )


def _gpu_results() -> dict:
    """What a GPU run writes, with one of each outcome: fits after an out-of-memory halving, a peak over the
    limit, a failed section, a skipped and a failed throughput setting."""
    plan = {"micro_batch": 1, "grad_accum": 4, "gradient_checkpointing": True, "tokens_per_micro_batch": 512}
    llama = {
        "model": "llama-3b",
        "status": "ok",
        "errors": [],
        "batch_size": 4,
        "quant": {"share_4bit": 1.0, "footprint_gib": 1.88, "bf16_gib": 6.38},
        "plan": plan,
        "initial_plan": {**plan, "micro_batch": 2, "grad_accum": 2, "estimate_gib": 6.12},
        "train": {"real_tok_s": 1234.5, "padding_share": 0.08},
        "peak_gib": 5.1,
        "peak_ok": True,
        "oom_events": [{"event": "out_of_memory", "step": 1}],
    }
    bloom = {
        **llama,
        "model": "bloom-3b",
        "batch_size": 2,
        "peak_gib": 7.9,
        "peak_ok": False,
        "oom_events": [],
    }
    falcon = {
        "model": "falcon-1b",
        "status": "exit code 1",
        "errors": [{"where": "falcon", "error": "RuntimeError: boom"}],
    }
    variant = {
        "batch_size": 64,
        "training": {"gradient_checkpointing": "on", "tokens_per_micro_batch": 16384},
    }
    return {
        "mode": "gpu",
        "versions": {"torch": "2.11", "transformers": "5.17", "peft": "0.21", "bitsandbytes": "0.50.2"},
        "settings": {"steps": 12, "warmup": 3, "cap_gib": 8.0, "peak_limit_gib": 7.5},
        "device": {"gpu": "NVIDIA H200", "total_gib": 139.8},
        "wall_s": 321.0,
        "models": {"llama": llama, "bloom": bloom, "falcon": falcon},
        "anchor": {
            "found": True,
            "status": "ok",
            "report_row": {"real_tok_s": 1650.0, "peak_gib": 4.0, "pad_frac": 0.32},
        },
        "throughput": {
            "status": "ok",
            "errors": [],
            "best": "bs64_grouped_gc",
            "variants": [
                {
                    **variant,
                    "name": "bs64_grouped_gc",
                    "plan": {**plan, "micro_batch": 32, "grad_accum": 2, "tokens_per_micro_batch": 16384},
                    "train": {"real_tok_s": 9900.0, "padding_share": 0.09},
                    "peak_gib": 30.2,
                },
                {**variant, "name": "bs64_grouped", "skipped": "out of time"},
                {
                    **variant,
                    "name": "bs4_padded_gc",
                    "error": "RuntimeError: out of memory even at micro-batch 1",
                },
            ],
        },
    }


def test_table_of_a_gpu_run():
    results = _gpu_results()
    results["checks"] = table.checks(results)
    assert results["checks"]["failed"] == ["falcon"]
    assert (
        results["checks"]["peaks_ok"] is False and results["checks"]["all_4bit"] is False
    )  # falcon: no share
    assert results["checks"]["best_ratio"] == 6.0 and results["checks"]["meets_goal"] is True
    assert table.verdict_ok(results["checks"]) is False
    lines = table.table(results).splitlines()
    assert lines[0].startswith("== gpu_check (gpu) on NVIDIA H200 140 GiB | torch 2.11")
    llama = next(line for line in lines if line.startswith("llama-3b"))
    assert "1.000" in llama and "1.88" in llama and "1x4 gc" in llama and "6.12" in llama and "1,234" in llama
    assert llama.endswith("1 OOM->halved")
    assert "PEAK > 7.5 GiB" in next(line for line in lines if line.startswith("bloom-3b"))
    assert "exit code 1 RuntimeError: boom" in next(line for line in lines if line.startswith("falcon-1b"))
    assert any("cap 8.0 GiB" in line for line in lines)
    grouped = next(line for line in lines if "bs64_grouped_gc:" in line)
    assert (
        "plan 32x2 gc" in grouped and "9,900" in grouped and "30.20" in grouped and "6.00 <- best" in grouped
    )
    assert "out of time" in next(line for line in lines if "bs64_grouped:" in line)
    assert "out of memory even at micro-batch 1" in next(line for line in lines if "bs4_padded_gc:" in line)
    assert lines[-1] == (
        "verdict: 4-bit everywhere: NO; peaks <= 7.5 GiB: NO; best/anchor: 6.00x (goal 4x met); "
        "sections failed: falcon"
    )


def test_verdict_of_a_run_that_passes_and_of_skipped_sections():
    results = _gpu_results()
    results["models"]["bloom"]["peak_ok"] = True
    results["models"]["falcon"] = {**results["models"]["llama"], "model": "falcon-1b", "oom_events": []}
    c = table.checks(results)
    assert c == {**c, "all_4bit": True, "peaks_ok": True, "failed": []} and table.verdict_ok(c)
    results["models"]["falcon"] = {"model": "falcon-1b", "status": "skipped: out of time", "errors": []}
    results["throughput"] = {"status": "skipped: out of time", "variants": [], "errors": []}
    c = table.checks(results)
    assert c["failed"] == ["falcon", "throughput"] and not table.verdict_ok(c)
    results["checks"] = c
    text = table.table(results)
    assert "skipped: out of time" in next(line for line in text.splitlines() if line.startswith("falcon-1b"))
    assert "throughput section: skipped: out of time" in text


def test_table_without_anchor():
    results = _gpu_results()
    results["anchor"] = {"found": False, "path": "/nowhere/anchor_bench.py", "status": "not found"}
    results["checks"] = table.checks(results)
    text = table.table(results)
    assert "anchor not found (/nowhere/anchor_bench.py): ratio skipped" in text
    assert results["checks"]["failed"] == ["falcon", "anchor"] and "best/anchor: n/a" in text
    results["anchor"] = None  # --no-anchor
    results["checks"] = table.checks(results)
    assert "anchor not run: ratio skipped" in table.table(results)
    assert results["checks"]["failed"] == ["falcon"]


def test_verdict_of_a_rerun_of_the_throughput_alone():
    results = _gpu_results()
    results["models"] = {}  # --only throughput,anchor
    results["checks"] = c = table.checks(results)
    assert c["all_4bit"] is None and c["peaks_ok"] is None and not c["failed"] and table.verdict_ok(c)
    assert table.table(results).splitlines()[-1] == (
        "verdict: 4-bit everywhere: n/a; peaks: n/a; best/anchor: 6.00x (goal 4x met); sections failed: none"
    )


def test_anchor_is_stopped_after_the_report_row(tmp_path):
    fake = tmp_path / "anchor_bench.py"
    fake.write_text(
        textwrap.dedent(
            """
            import json, os, time
            print(json.dumps({"what": "versions", "gpu": "cpu"}), flush=True)
            print("a warning line", flush=True)
            print(json.dumps({"what": "train", "variant": "report_bs4_pad_gc", "real_tok_s": 12.5,
                              "steps": int(os.environ["STEPS"]), "scale": os.environ.get("SCALE")}), flush=True)
            time.sleep(60)
            """
        )
    )
    t = time.time()
    res = anchor.run_anchor(
        fake, str(fake), tmp_path, 50, steps=12, warmup=3, tiny=True, env=dict(os.environ)
    )
    assert time.time() - t < 30
    assert res["status"] == "ok" and res["report_row"]["real_tok_s"] == 12.5 and res["gpu"] == "cpu"
    assert res["report_row"]["steps"] == 9 and res["report_row"]["scale"] == "tiny"
    assert "a warning line" in (tmp_path / "log-anchor.txt").read_text()
    missing = anchor.run_anchor(None, "../nowhere.py", tmp_path, 5, steps=12, warmup=3, tiny=True, env={})
    assert missing == {"path": "../nowhere.py", "found": False, "rows": [], "status": "not found"}
    assert anchor.find_anchor(str(tmp_path / "absent.py")) is None
    assert anchor.find_anchor(str(fake)) == fake


def test_anchor_error_row_ends_it(tmp_path):
    fake = tmp_path / "anchor_bench.py"
    fake.write_text(
        'import json, time\nprint(json.dumps({"what": "error", "where": "llama-3b", "err": "no GPU"}), flush=True)\n'
        "time.sleep(60)\n"
    )
    res = anchor.run_anchor(
        fake, str(fake), tmp_path, 50, steps=12, warmup=3, tiny=True, env=dict(os.environ)
    )
    assert res["status"] == "anchor error: no GPU" and "report_row" not in res and res["section_s"] < 30


# Section stand-ins for the runner test (module level, so a spawned process can import them).
def _section_ok(name, opts, part, log):
    write_json(part, {"section": name, "errors": [], "steps": opts["steps"]})


def _section_crashes(name, opts, part, log):
    write_json(part, {"section": name, "errors": [], "half": "written before the crash"})
    Path(log).write_text("something broke\n")
    os._exit(3)


def _section_hangs(name, opts, part, log):
    time.sleep(60)


def test_a_failing_or_hanging_section_leaves_the_others_standing(tmp_path):
    run = runner.Runner(tiny=False, work=tmp_path)  # spawn: a fresh interpreter per section, as on a GPU
    crashed = run.run("a", {"steps": 3}, 60, target=_section_crashes)
    assert crashed["status"] == "exit code 3" and crashed["half"] == "written before the crash"
    assert crashed["log_tail"] == "something broke"
    t = time.time()
    hung = run.run("b", {"steps": 3}, 3, target=_section_hangs)
    assert hung["status"] == "timed out after 3 s" and time.time() - t < 20
    assert hung == {**hung, "section": "b", "errors": []}
    ok = run.run("c", {"steps": 3}, 60, target=_section_ok)
    assert ok["status"] == "ok" and ok["steps"] == 3 and "log_tail" not in ok


def test_synthetic_rows_have_alpacas_lengths_and_their_record(tmp_path):
    from datasets import load_from_disk

    lengths = models.alpaca_lengths(4000, 512, seed=0)
    assert min(lengths) == 40 and max(lengths) == 512 and 140 <= sorted(lengths)[2000] <= 160
    data = models.synthetic_data(tmp_path, 24, 32000, 512, seed=1, base_model="openlm-research/open_llama_3b")
    rows = load_from_disk(data.train.path)
    assert rows.column_names == ["input_ids", "labels", "length", "response_bytes"] and len(rows) == 24
    assert data.eval is None and data.train.padding_free_tokens == sum(rows["length"])
    first = rows[0]
    assert len(first["input_ids"]) == first["length"] and all(4 <= i < 32000 for i in first["input_ids"])
    assert first["labels"][: first["length"] // 3] == [-100] * (first["length"] // 3)
    assert data.train.label_tokens == sum(sum(x != -100 for x in r) for r in rows["labels"])


def test_tiny_run_end_to_end(tmp_path):
    """The whole check on the CPU with the three families' tiny configs, no anchor (about 20 s on 2 cores).
    The library's fault hook makes every micro-batch above 2 rows run out of memory from the second step on,
    so the stage's halving shows up where the plan starts above it (llama, the throughput settings)."""
    proc = _run(["--tiny", "--no-anchor"], tmp_path, timeout=300, QABOT_SIMULATE_OOM="1:2")
    out = proc.stdout
    assert proc.returncode == 0, out[-5000:] + proc.stderr[-3000:]
    assert "== gpu_check (tiny) on cpu" in out
    assert out.rstrip().splitlines()[-1] == (
        "verdict: 4-bit everywhere: yes; peaks: n/a on CPU; best/anchor: n/a; sections failed: none"
    )
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert KEYS <= set(data) and data["mode"] == "tiny" and data["ok"] is True
    assert Path(data["library"]) == ROOT / "pipeline_lib"
    for family, name, batch in (
        ("llama", "llama-3b", 4),
        ("bloom", "bloom-3b", 2),
        ("falcon", "falcon-1b", 1),
    ):
        m = data["models"][family]
        assert m["status"] == "ok" and not m["errors"] and m["model"] == name and m["batch_size"] == batch
        assert m["quant"]["share_4bit"] == 1.0 and m["quant"]["linear_kinds"] == ["Linear4bit"]
        assert m["quant"]["check"] == "ok" and m["stage_share_4bit"] == 1.0
        assert m["train"]["real_tok_s"] > 0 and m["train"]["steps_timed"] == 2 and m["train"]["steps"] == 3
        assert m["optimizer"] == "adamw_torch" and m["peak_gib"] is None and m["process_rss_gib"] > 0
        assert m["imported"] == {"prefect": False, "mlflow": False}  # the GPU machine has neither package
        assert data["checks"]["share_4bit"][name] == 1.0
        assert next(line for line in out.splitlines() if line.startswith(name)).endswith(
            "1 OOM->halved" if family == "llama" else " ok"
        )
    llama = data["models"]["llama"]
    assert [e["new_plan"]["micro_batch"] for e in llama["oom_events"]] == [2]
    assert llama["initial_plan"]["micro_batch"] == 4 and llama["plan"]["micro_batch"] == 2
    assert llama["plan"]["grad_accum"] == 2
    assert data["checks"]["all_4bit"] is True and data["checks"]["peaks_ok"] is None
    assert data["anchor"] is None and data["checks"]["best_ratio"] is None
    tp = data["throughput"]
    variants = {v["name"]: v for v in tp["variants"]}
    assert set(variants) == {"bs8_grouped", "bs8_grouped_gc", "bs4_padded_gc"} and tp["best"] in variants
    assert all(v["train"]["real_tok_s"] > 0 and v["plan"]["micro_batch"] <= 2 for v in variants.values())
    assert variants["bs8_grouped_gc"]["initial_plan"]["gradient_checkpointing"] is True
    assert all(0 <= v["train"]["padding_share"] < 1 for v in variants.values())
    log = (tmp_path / "gpu_check.log").read_text()
    assert all(f"===== {s} =====" in log for s in ("llama", "bloom", "falcon", "throughput"))


@pytest.mark.gpu
def test_full_gpu_check(tmp_path):
    """Every GPU check (about 6-7 minutes on an H100/H200): all linear layers 4-bit, peaks under the limit."""
    proc = _run([], tmp_path, timeout=900)
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert data["mode"] == "gpu"
    assert data["checks"]["all_4bit"] is True, data["checks"]
    assert data["checks"]["peaks_ok"] is True, data["checks"]
    assert not data["checks"]["failed"], proc.stdout[-5000:]
    assert proc.returncode == 0
