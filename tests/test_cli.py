"""The command line: `qabot data prepare`, config commands, one-line errors with non-zero exits."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from network import needs_no_hub

from pipeline_lib.synthetic import NON_ENGLISH_ROWS, alpaca_rows, alpaca_sized_rows, defective_rows

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


def _rows_file(path: Path, n: int, seed: int) -> Path:
    rows = alpaca_sized_rows(n, seed=seed)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_data_prepare_lone_surrogate_is_a_data_error_and_leaves_nothing(tmp_path):
    src = tmp_path / "s.jsonl"
    src.write_text(
        '{"instruction": "Say hi.", "input": "", "output": "hi"}\n'
        '{"instruction": "Say \\ud800 bye.", "input": "", "output": "bye"}\n'
        '{"instruction": "Name a cat.", "input": "", "output": "Tom"}\n'
    )
    proc = qabot("data", "prepare", "--source", str(src), "--out", str(tmp_path / "out"))
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip() == (
        f"qabot: error: {src}: line 2: lone surrogate in 'instruction' (\\ud800), not valid Unicode text; "
        "fix or remove that escape"
    )
    assert not (tmp_path / "out").exists()


def test_data_prepare_refuses_an_empty_out(tmp_path):
    src = _rows_file(tmp_path / "in.jsonl", 20, seed=1)
    work = tmp_path / "cwd"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "data", "prepare", "--source", str(src), "--out", ""],
        cwd=work, capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip() == "qabot: error: --out: must not be empty"
    assert list(work.iterdir()) == []


def test_data_prepare_bad_sha256_names_the_flag(tmp_path):
    src = _rows_file(tmp_path / "in.jsonl", 20, seed=1)
    proc = qabot("data", "prepare", "--source", str(src), "--out", str(tmp_path / "out"), "--sha256", "xyz")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "qabot: error: --sha256: must be 64 hexadecimal characters"
    assert not (tmp_path / "out").exists()


def test_data_prepare_unsupported_scheme_is_named(tmp_path):
    proc = qabot("data", "prepare", "--source", "ftp://x/alpaca.json", "--out", str(tmp_path / "out"))
    assert proc.returncode == 1
    line = proc.stderr.strip()
    assert line.startswith("qabot: error: ftp://x/alpaca.json: unsupported scheme 'ftp://'"), line
    assert "\n" not in line and not (tmp_path / "out").exists()


def test_failed_data_prepare_removes_only_what_it_created(tmp_path):
    out = tmp_path / "out"
    good = _rows_file(tmp_path / "good.jsonl", 40, seed=2)
    assert qabot("data", "prepare", "--source", str(good), "--out", str(out)).returncode == 0
    (out / "notes.txt").write_text("mine")
    (out / "raw" / "other").mkdir()
    (out / "raw" / "other" / "keep.json").write_text("[]")
    before = _files(out)
    dirs = sorted(p for p in out.rglob("*") if p.is_dir())
    bad = tmp_path / "bad.json"
    bad.write_text('[{"instruction": "a", "output": "b"}, {"instruction": ')  # a full copy would land in raw/
    proc = qabot("data", "prepare", "--source", str(bad), "--out", str(out))
    assert proc.returncode == 1 and "not valid JSON" in proc.stderr
    assert _files(out) == before  # the earlier outputs, the raw copy of good.jsonl and the user's files stay
    assert sorted(p for p in out.rglob("*") if p.is_dir()) == dirs  # no new directory either
    fresh = tmp_path / "fresh" / "out"
    assert qabot("data", "prepare", "--source", str(bad), "--out", str(fresh)).returncode == 1
    assert not fresh.exists() and (tmp_path / "fresh").exists() is False


def test_concurrent_data_prepare_into_one_out_all_succeed(tmp_path):
    """Four runs at once into one --out (two sources, so a mixed set would show), twice: every run succeeds
    and the files left are one run's complete, consistent set."""
    out = tmp_path / "out"
    sources = [_rows_file(tmp_path / f"in{k}.jsonl", 6000, seed=k) for k in (1, 2)]
    cmd = [sys.executable, "-m", "flows.cli", "data", "prepare", "--out", str(out), "--source"]
    for _ in range(2):  # the second round replaces a complete set
        procs = [
            subprocess.Popen(cmd + [str(sources[i % 2])], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
            for i in range(4)
        ]  # fmt: skip
        results = [(p.communicate(timeout=180)[1], p.returncode) for p in procs]
        assert [rc for _, rc in results] == [0, 0, 0, 0], results
    names = sorted(p.name for p in out.iterdir())
    assert names == ["audit.json", "clean.jsonl", "eval.jsonl", "raw", "train.jsonl"], names
    assert not [p for p in out.rglob(".*")], "temporary files left behind"
    audit = json.loads((out / "audit.json").read_text(encoding="utf-8"))
    data = {k: (out / f"{k}.jsonl").read_bytes() for k in ("clean", "train", "eval")}
    h = hashlib.sha256()
    for k in ("clean", "train", "eval"):
        h.update(f"{k}:{len(data[k])}:".encode() + data[k])
    assert audit["fingerprint"] == h.hexdigest()[:16]
    lines = {k: data[k].decode().splitlines() for k in data}
    assert len(lines["clean"]) == audit["rows_out"] == audit["n_train"] + audit["n_eval"]
    assert sorted(lines["train"] + lines["eval"]) == sorted(lines["clean"])
    src = next(s for s in sources if str(s) == audit["source"])
    assert audit["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()


def test_demo_progress_lines_and_summary(tmp_path):
    from flows.watch import progress_bar, stage_line, summarize

    assert progress_bar(50, "llama-tiny: 100% of its steps") == (
        "  training [############------------]  50%  llama-tiny: 100% of its steps"
    )
    assert progress_bar(140).count("#") == 24 and progress_bar(-3).count("#") == 0
    assert stage_line("train", "Cached", 0.04) == "  ✓ train                  Cached         0.0 s"
    assert stage_line("merge", "Failed", None).startswith("  ✗ merge")
    (tmp_path / "scoreboard.csv").write_text(
        "model,train_time_s,bits_per_byte_before,bits_per_byte,question_score_before,question_score\n"
        "llama-tiny,14.2,3.4163,1.2771,0.0,0.3333\nbloom-tiny,26.2,4.5,,0,0\n"
    )
    (tmp_path / "report.md").write_text("# r\n\nBest model: **llama-tiny** — rule: highest question score\n")
    lines = summarize(tmp_path)
    assert lines[1].split() == ["llama-tiny", "14", "s", "3.416", "→", "1.277", "0.00", "→", "0.33"]
    assert lines[2].split()[5] == "–"  # a missing value is shown as missing, not as 0
    assert lines[-1] == "  Best model: llama-tiny"
    assert summarize(tmp_path / "nowhere") == [f"(no scoreboard in {tmp_path / 'nowhere'})"]
