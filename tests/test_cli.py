"""The command line: `qabot data prepare`, config commands, one-line errors with non-zero exits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from network import needs_no_hub

from pipeline_lib.synthetic import NON_ENGLISH_ROWS, alpaca_rows, defective_rows

ROOT = Path(__file__).resolve().parent.parent


def qabot(*args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_data_prepare_keeps_clean_rows_and_fixes_defects(tmp_path):
    clean = alpaca_rows(60, seed=3)
    clean = list({json.dumps(r, sort_keys=True): r for r in clean}.values()) + NON_ENGLISH_ROWS
    bad = defective_rows()
    src = tmp_path / "mixed.json"
    src.write_text(
        json.dumps(
            [{k: r[k] for k in ("instruction", "input", "output") if k in r} for r in clean + bad],
            ensure_ascii=False,
        )
    )
    proc = qabot("data", "prepare", "--source", str(src), "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    kept = [json.loads(line) for line in (tmp_path / "out" / "clean.jsonl").read_text().splitlines()]
    audit = json.loads((tmp_path / "out" / "audit.json").read_text())
    assert audit["rows_in"] == len(clean) + len(bad)
    assert audit["rows_in"] == audit["rows_out"] + audit["dropped"] == len(kept) + audit["dropped"]
    kept_keys = {(r["instruction"], r["input"], r["output"]) for r in kept}
    for r in clean:  # every clean row, English or not, survives unchanged
        assert (r["instruction"], r.get("input", ""), r["output"]) in kept_keys, r
    for r in bad:
        if r["rule"] in ("duplicate", "near_duplicate"):
            continue  # a copy of a kept row
        original = tuple(str(r.get(k, "")) for k in ("instruction", "input", "output"))
        assert original not in kept_keys, f"{r['rule']}: defective row kept unchanged"
        if r["action"] == "repair" and r["expected"]:
            e = r["expected"]
            assert (e["instruction"], e["input"], e["output"]) in kept_keys, f"{r['rule']}: repair missing"


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (None, "not found"),
        ("", "empty"),
        ("{broken", "JSON"),
        ('"just a string"', "list"),
        ('[{"question": "q", "answer": "a"}]', "Alpaca"),
        (b"\x00\x01\x02\xff\xfe binary", "binary"),
    ],
)
def test_data_prepare_bad_input_is_one_line(tmp_path, content, needle):
    src = tmp_path / "data.json"
    if isinstance(content, bytes):
        src.write_bytes(content)
    elif content is not None:
        src.write_text(content)
    proc = qabot("data", "prepare", "--source", str(src), "--out", str(tmp_path / "out"))
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert (
        lines[0].startswith("qabot: error:") and str(src) in lines[0] and needle.lower() in lines[0].lower()
    )
    assert not (tmp_path / "out" / "clean.jsonl").exists()


@needs_no_hub
def test_run_with_unreachable_hub_stops_in_seconds_naming_what():
    proc = qabot("run", "--profile", "report", "--no-services", timeout=60)
    assert proc.returncode != 0
    line = proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr
    for what in (
        "tatsu-lab/alpaca",
        "openlm-research/open_llama_3b",
        "bigscience/bloom-3b",
        "tiiuae/falcon-rw-1b",
    ):
        assert what in line


def test_bad_config_file_is_one_line(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("profile: smoke\ntraining:\n  warmup_ratio: 2\n")
    proc = qabot("run", "--config", str(f), "--no-services")
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"qabot: error: {f}: training.warmup_ratio: Input should be less than 1"


def test_config_show_and_schema():
    proc = qabot("config", "show", "--profile", "report")
    assert proc.returncode == 0 and "open_llama_3b" in proc.stdout
    proc = qabot("config", "schema")
    schema = json.loads(proc.stdout)
    assert "models" in schema["properties"]
