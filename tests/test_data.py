"""Data stage: loading and its whole-file errors, every cleaning rule (catch, repair, no false positive),
the audit, acquiring from files, built-ins, http(s) and the Hugging Face Hub, splitting and `prepare`."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import pickle
import socket
import threading
import time
from pathlib import Path

import pytest
from network import needs_no_hub

from pipeline_lib import data as D
from pipeline_lib.config import CleaningConfig, DataConfig
from pipeline_lib.data import DataError
from pipeline_lib.synthetic import (
    NON_ENGLISH_ROWS,
    TRICKY_CLEAN_ROWS,
    alpaca_rows,
    alpaca_sized_rows,
    defective_rows,
    write_jsonl,
)

FIELDS = ("instruction", "input", "output")
ALL_CLEAN = NON_ENGLISH_ROWS + TRICKY_CLEAN_ROWS


def _bare(row: dict) -> dict:
    return {k: row[k] for k in FIELDS if k in row}


def _defects(action: str | None = None, dupes: bool = False) -> list[dict]:
    rows = [r for r in defective_rows() if (dupes or r["rule"] not in (D.DUPLICATE, D.NEAR_DUPLICATE))]
    return [r for r in rows if action is None or r["action"] == action]


def _counts(audit: D.Audit) -> dict[str, int]:
    return {k: v.count for k, v in audit.rules.items() if v.count}


def _one_line_naming(err: DataError, name: str) -> str:
    msg = str(err)
    assert "\n" not in msg and msg.startswith(f"{name}: "), msg
    return msg


# ------------------------------------------------------------------------------------------ no false positives


def test_clean_synthetic_rows_are_untouched():
    rows = alpaca_rows(500)
    out, audit = D.clean(rows, CleaningConfig(drop_duplicates=False))
    assert out == rows
    assert audit.rows_in == audit.rows_out == 500 and audit.dropped == 0 and audit.repaired == 0


@pytest.mark.parametrize("row", ALL_CLEAN, ids=lambda r: r["instruction"][:30])
def test_clean_rows_in_any_language_survive_unchanged(row):
    out, audit = D.clean([row])
    assert out == [row], _counts(audit)
    assert _counts(audit) == {}


def test_synthetic_template_duplicates_are_found_when_switched_on():
    rows = alpaca_rows(500)
    out, audit = D.clean(rows)
    assert audit.count(D.DUPLICATE) == 500 - len({tuple(r.values()) for r in rows}) > 0
    assert len(out) == audit.rows_out == 500 - audit.dropped


# ------------------------------------------------------------------------------------------ each rule catches


@pytest.mark.parametrize(
    "row", _defects("drop"), ids=lambda r: f"{r['rule']}:{str(r.get('instruction'))[:20]}"
)
def test_drop_rules_drop_their_defect(row):
    out, audit = D.clean([_bare(row)])
    assert out == []
    assert audit.count(row["rule"]) == 1 and audit.dropped == 1, _counts(audit)


# the field each drop rule looks at, as the audit shows it
DROP_FIELDS = {"empty_output": "output", "nooutput": "output", "na_output": "output",
               "unclear_instruction": "instruction", "missing_input": "instruction",
               "hallucination_bait": "input", "empty_code": "output"}  # fmt: skip


def test_each_rule_declares_its_field_and_the_audit_shows_it():
    assert {r.name: r.field for r in D.RULES if r.action == "drop"} == DROP_FIELDS
    for row in _defects("drop"):
        if row["rule"] not in DROP_FIELDS:
            continue
        _, audit = D.clean([_bare(row)])
        ex = audit.rules[row["rule"]].examples[0]
        assert ex["field"] == DROP_FIELDS[row["rule"]], row


@pytest.mark.parametrize("row", _defects("repair"), ids=lambda r: f"{r['rule']}:{r['instruction'][:20]}")
def test_repair_rules_repair_their_defect(row):
    out, audit = D.clean([_bare(row)])
    assert out == [row["expected"]]
    assert audit.count(row["rule"]) == 1 and audit.dropped == 0, _counts(audit)
    ex = audit.rules[row["rule"]].examples[0]
    assert ex["row"] == 0 and ex["before"] != ex["after"]


@pytest.mark.parametrize("rule", D.RULES, ids=lambda r: r.name)
def test_every_rule_can_be_switched_off(rule):
    rows = [_bare(r) for r in _defects() if r["rule"] == rule.name]
    assert rows, f"no defect example for {rule.name}"
    _, on = D.clean(rows)
    _, off = D.clean(rows, CleaningConfig(**{rule.flag: False}))
    assert on.count(rule.name) == len(rows)
    assert off.count(rule.name) == 0 and off.rules[rule.name].enabled is False


def test_every_flag_has_a_rule():
    flags = {r.flag for r in D.RULES} | {"drop_duplicates"}
    assert flags == set(CleaningConfig.model_fields)


def test_repairs_run_before_drops():
    # a merged instruction that leaves nothing is dropped as empty; a placeholder input then counts as missing
    rows = [
        {"instruction": "Name a bird.", "input": "", "output": "##\n3. Instruction: Name a fish."},
        {"instruction": "Summarize the following text.", "input": "<noinput>", "output": "A summary."},
    ]
    out, audit = D.clean(rows)
    assert out == []
    assert _counts(audit) == {
        "merged_instruction": 1,
        "empty_output": 1,
        "empty_input": 1,
        "missing_input": 1,
    }


def test_control_chars_keep_newlines_tabs_and_code_escapes():
    code = "def f(x):\n\treturn x\n\nprint(f('a\\nb'))"
    row = {"instruction": "Write a Python function f.", "input": "", "output": code + "\x07\x00"}
    out, audit = D.clean([row])
    assert out[0]["output"] == code
    lone = {"instruction": "Say hi.", "input": "", "output": "hi \ud83d there"}
    assert D.clean([lone])[0][0]["output"] == "hi  there"


def test_stray_escapes_only_repaired_in_prose():
    prose = {"instruction": "List two steps.", "input": "", "output": "Mix it.\\nBake it.\\n"}
    assert D.clean([prose])[0][0]["output"] == "Mix it.\nBake it."
    path = {"instruction": "Where is the file?", "input": "", "output": "It is in C:\\new\\Files."}
    assert D.clean([path])[0] == [path]


def test_merged_instruction_leaves_markdown_headings_alone():
    md = {"instruction": "Write notes.", "input": "", "output": "Intro.\n## Usage\nRun it.\n## Notes\nNone."}
    assert D.clean([md])[0] == [md]


@pytest.mark.parametrize(
    "output",
    ["<nooutput>", "<No Output>", "[no output]", "(No output).",
     "As an AI language model, I cannot create images of cats."],
)  # fmt: skip
def test_nooutput_variants(output):
    out, audit = D.clean([{"instruction": "Make a drawing of a cat.", "input": "", "output": output}])
    assert out == [] and audit.count("nooutput") == 1


def test_nooutput_leaves_plain_no_output_answers():
    row = {"instruction": "What does print(end='') show on the screen?", "input": "", "output": "No output."}
    assert D.clean([row])[0] == [row]


def test_hallucination_bait_keeps_inputs_that_mention_media_in_text():
    row = {
        "instruction": "Classify the sentence.",
        "input": "I attached a picture of my dog.",
        "output": "Statement.",
    }
    html = {
        "instruction": "What does this HTML do?",
        "input": "<video controls></video>",
        "output": "A video player.",
    }
    assert D.clean([row, html])[0] == [row, html]


@pytest.mark.parametrize(
    "output",
    ["For each word, the function swaps its letters.\nIf the list is empty, it returns nothing.",
     "Sort the names alphabetically and return them."],
)  # fmt: skip
def test_empty_code_prose_answers_are_dropped(output):
    row = {"instruction": "Write a JavaScript function that sorts names.", "input": "", "output": output}
    out, audit = D.clean([row])
    assert out == [] and audit.count("empty_code") == 1


def test_unclear_instruction_counts_letters_in_any_script():
    short = [{"instruction": "翻译", "input": "你好", "output": "Hello"}]
    assert D.clean(short)[0] == short
    none = [{"instruction": "42 + ?", "input": "", "output": "I cannot tell."}]
    assert D.clean(none)[0] == []


# ------------------------------------------------------------------------------------------------ duplicates


def test_exact_and_normalised_duplicates_keep_the_first():
    base = alpaca_rows(14, seed=3)
    dupes = _defects(dupes=True)
    dupes = [_bare(r) for r in dupes if r["rule"] in (D.DUPLICATE, D.NEAR_DUPLICATE)]
    out, audit = D.clean(base + dupes)
    assert out == base
    assert audit.count(D.DUPLICATE) == 1 and audit.count(D.NEAR_DUPLICATE) == 2
    assert {ex["of"] for ex in audit.rules[D.NEAR_DUPLICATE].examples} == {1, 2}
    out_off, audit_off = D.clean(base + dupes, CleaningConfig(drop_duplicates=False))
    assert len(out_off) == len(base) + len(dupes) and audit_off.dropped == 0


@pytest.mark.parametrize(("a", "b"), [("x = -3", "x = 3"), ("3.5", "35"), ("😀", "😢"), ("Да", "Нет")])
def test_near_duplicates_do_not_merge_different_answers(a, b):
    rows = [
        {"instruction": "Answer.", "input": "", "output": a},
        {"instruction": "Answer.", "input": "", "output": b},
    ]
    assert D.clean(rows)[0] == rows


def test_same_question_with_different_answers_is_kept():
    rows = [
        {"instruction": "Name a color.", "input": "", "output": "Red."},
        {"instruction": "name a color", "input": "", "output": "Blue."},
        {"instruction": "NAME A COLOR!", "input": "", "output": "red"},
    ]
    out, audit = D.clean(rows)
    assert out == rows[:2] and audit.count(D.NEAR_DUPLICATE) == 1


# ----------------------------------------------------------------------------------------------------- audit


def test_audit_adds_up_and_serialises():
    rows = alpaca_rows(40) + [_bare(r) for r in _defects(dupes=True)] * 2
    out, audit = D.clean(rows)
    d = audit.to_dict()
    assert d["rows_in"] == len(rows) == d["rows_out"] + d["dropped"]
    assert d["rows_out"] == len(out)
    assert d["dropped"] == sum(s["count"] for s in d["rules"].values() if s["action"] == "drop")
    assert all(len(s["examples"]) <= 3 for s in d["rules"].values())
    assert set(d["rules"]) == set(D.rule_names()) - {D.SAMPLED_OUT}
    assert json.loads(json.dumps(d)) == d
    assert D.Audit.from_dict(d).to_dict() == d


def test_audit_examples_show_index_and_truncated_text():
    long = "A" * 300 + "\x00"
    rows = [
        {"instruction": "Say A.", "input": "", "output": "fine"},
        {"instruction": "Say A.", "input": "", "output": long},
    ]
    _, audit = D.clean(rows)
    ex = audit.rules["control_chars"].examples[0]
    assert ex["row"] == 1 and ex["field"] == "output"
    assert len(ex["before"]) <= 80 and ex["before"].endswith("…") and len(ex["after"]) <= 80


def test_audit_table_lists_every_rule():
    rows = [_bare(r) for r in _defects()]
    _, audit = D.clean(rows)
    table = D.audit_table(audit)
    assert [t["rule"] for t in table] == list(audit.rules)
    by_rule = {t["rule"]: t for t in table}
    assert by_rule["nooutput"]["count"] == 3 and by_rule["nooutput"]["action"] == "drop"
    assert by_rule["nooutput"]["example"].startswith("row ")
    assert by_rule["empty_input"]["action"] == "repair"
    assert D.audit_table(audit.to_dict()) == table
    assert set(table[0]) >= {"rule", "action", "count", "example"}


def test_invalid_rows_are_dropped_with_reasons():
    rows = [_bare(r) for r in _defects() if r["rule"] == "invalid_row"] + [
        {"instruction": "Hi", "input": None, "output": "Hello"}
    ]
    out, audit = D.clean(rows)
    assert out == [{"instruction": "Hi", "input": "", "output": "Hello"}]
    reasons = [ex["reason"] for ex in audit.rules["invalid_row"].examples]
    assert reasons == ["'instruction' is a number, not a string", "'input' is a list, not a string",
                       "missing 'instruction'"]  # fmt: skip


# ------------------------------------------------------------------------------------------------ load_rows


def test_load_json_and_jsonl(tmp_path):
    rows = alpaca_rows(5) + NON_ENGLISH_ROWS
    (tmp_path / "a.json").write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    write_jsonl(rows, tmp_path / "b.jsonl")
    (tmp_path / "c.txt").write_text("\ufeff" + json.dumps(rows), encoding="utf-8")  # BOM, no suffix hint
    assert D.load_rows(tmp_path / "a.json") == rows
    assert D.load_rows(tmp_path / "b.jsonl") == rows
    assert D.load_rows(tmp_path / "c.txt") == rows


def test_load_parquet(tmp_path):
    import pandas as pd

    rows = alpaca_rows(5)
    pd.DataFrame(rows).to_parquet(tmp_path / "a.parquet")
    assert D.load_rows(tmp_path / "a.parquet") == rows


WHOLE_FILE_ERRORS = {
    "missing": (None, "file not found"),
    "empty": (b"", "file is empty"),
    "blank": (b" \n\n ", "file is empty"),
    "binary": (b"\x89PNG\r\n\x1a\n\x00\x00\x00", "binary file"),
    "latin1": ('[{"instruction": "caf\u00e9", "output": "x"}]'.encode("latin-1"), "not UTF-8 text (byte 0xe9"),
    "bad_json": (b'[\n {"instruction": "a",\n  "output" "b"}\n]', "not valid JSON (line 3, column 12"),
    "truncated": (b'[{"instruction": "a", "output": "b"}', "not valid JSON (line 1"),
    "object": (b'{\n "instruction": "a",\n "output": "b"\n}', "single JSON object, not a list"),
    "scalar": (b'"just a string"', "top level is a string, not a list of row objects"),
    "not_objects": (b'[{"instruction": "a", "output": "b"}, [1, 2]]', "item 1 of the top-level list is a list"),
    "jsonl_bad": (b'{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "output": }\n',
                  "not valid JSON Lines (line 3, column"),
    "jsonl_list": (b'{"instruction": "a", "output": "b"}\n[1]\n', "line 2 is a list, not a JSON object"),
    "no_rows": (b"[]", "contains no rows"),
    "no_alpaca": (b'[{"question": "a", "answer": "b"}]',
                  "no rows with the Alpaca fields 'instruction' and 'output' (found: answer, question)"),
}  # fmt: skip


@pytest.mark.parametrize("case", WHOLE_FILE_ERRORS)
def test_whole_file_errors_are_one_line_naming_the_file(tmp_path, case):
    content, problem = WHOLE_FILE_ERRORS[case]
    path = tmp_path / f"{case}.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError) as err:
        D.load_rows(path)
    msg = _one_line_naming(err.value, str(path))
    assert problem in msg
    with pytest.raises(DataError) as named:  # the name shown can be the user's source, not the cache path
        D.load_rows(path, name="data/x.json")
    assert str(named.value).startswith("data/x.json: ")


def test_a_lone_surrogate_is_a_data_error_naming_the_file_and_line(tmp_path):
    ok = '{"instruction": "Say hi.", "input": "", "output": "hi"}'
    bad = '{"instruction": "Say \\ud800 bye.", "input": "", "output": "bye"}'  # a JSON escape, as in the file
    pair = '{"instruction": "Smile.", "input": "", "output": "\\ud83d\\ude00"}'  # a valid pair: one emoji
    jsonl = tmp_path / "s.jsonl"
    jsonl.write_text(f"{ok}\n{pair}\n{bad}\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        D.load_rows(jsonl)
    msg = _one_line_naming(err.value, str(jsonl))
    assert "line 3: lone surrogate in 'instruction' (\\ud800)" in msg
    arr = tmp_path / "s.json"
    bad_output = '{"instruction": "Say bye.", "input": "", "output": "bye \\ud800"}'
    arr.write_text(f"[\n{ok},\n{pair},\n{bad_output}\n]")
    with pytest.raises(DataError) as err:
        D.load_rows(arr)
    assert "item 2 (line 4): lone surrogate in 'output' (\\ud800)" in _one_line_naming(err.value, str(arr))
    nested = tmp_path / "n.jsonl"
    nested.write_text('{"instruction": "a", "output": "b", "meta": {"tags": ["x", "\\udc00"]}}\n')
    with pytest.raises(DataError, match=r"line 1: lone surrogate in 'meta'\['tags'\]\[1\] \(\\udc00\)"):
        D.load_rows(nested)
    fine = tmp_path / "fine.jsonl"
    fine.write_text(f"{ok}\n{pair}\n" + '{"instruction": "Escape.", "input": "", "output": "\\\\ud800"}\n')
    outputs = [r["output"] for r in D.load_rows(fine)]
    assert outputs == ["hi", "\U0001f600", "\\ud800"]  # an escaped backslash: text, not a surrogate


def test_prepare_refuses_an_empty_out_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for out in ("", "  "):
        with pytest.raises(ValueError, match="out_dir is empty"):
            D.prepare("builtin:smoke_alpaca.jsonl", out, DataConfig(source="builtin:smoke_alpaca.jsonl"))
    assert list(tmp_path.iterdir()) == []


def test_prepare_with_a_lone_surrogate_leaves_nothing_behind(tmp_path):
    src = tmp_path / "s.jsonl"
    src.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c\\ud800", "output": "d"}\n')
    out = tmp_path / "out"
    with pytest.raises(DataError, match="line 2: lone surrogate"):
        D.prepare(str(src), out, DataConfig(source=str(src)))
    assert not out.exists()


def test_a_file_where_only_some_rows_have_the_fields_loads(tmp_path):
    path = tmp_path / "mixed.jsonl"
    write_jsonl([{"question": "a"}, {"instruction": "Hi", "output": "Hello"}], path)
    out, audit = D.clean(D.load_rows(path))
    assert out == [{"instruction": "Hi", "input": "", "output": "Hello"}] and audit.count("invalid_row") == 1


def test_data_error_pickles_with_its_transience():
    err = pickle.loads(pickle.dumps(DataError("x.json", "bad\nthing", transient=True)))
    assert str(err) == "x.json: bad thing" and err.transient is True


# ------------------------------------------------------------------------------------------------- acquire


def test_acquire_local_file_is_content_addressed_and_idempotent(tmp_path):
    src = write_jsonl(alpaca_rows(10), tmp_path / "in.jsonl")
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    got = D.acquire(str(src), tmp_path / "raw")
    assert got.sha256 == sha and got.path == tmp_path / "raw" / sha[:16] / "raw.jsonl"
    assert got.path.read_bytes() == src.read_bytes() and got.source == str(src)
    mtime = got.path.stat().st_mtime_ns
    again = D.acquire(str(src), tmp_path / "raw", sha256=sha.upper())
    assert again == got and again.path.stat().st_mtime_ns == mtime
    assert D.Acquired.from_dict(json.loads(json.dumps(got.to_dict()))) == got


def test_acquire_local_errors(tmp_path):
    with pytest.raises(DataError) as err:
        D.acquire(str(tmp_path / "nope.json"), tmp_path / "raw")
    _one_line_naming(err.value, str(tmp_path / "nope.json"))
    src = write_jsonl(alpaca_rows(3), tmp_path / "in.jsonl")
    with pytest.raises(DataError, match="sha256 mismatch"):
        D.acquire(str(src), tmp_path / "raw", sha256="0" * 64)
    with pytest.raises(DataError, match="file not found"):
        D.acquire("data/alpaca.json", tmp_path / "raw")  # looks like owner/name but is a file name


def test_acquire_builtin(tmp_path):
    got = D.acquire("builtin:smoke_alpaca.jsonl", tmp_path / "raw")
    rows = D.load_rows(got.path)
    assert len(rows) == 900 and got.path.name == "raw.jsonl"
    for bad in ("builtin:nope.jsonl", "builtin:../config.py", "builtin:"):
        with pytest.raises(DataError) as err:
            D.acquire(bad, tmp_path / "raw")
        assert "smoke_alpaca.jsonl" in _one_line_naming(err.value, bad)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path.startswith("/slow"):
            time.sleep(3)
        super().do_GET()


@pytest.fixture()
def http_dir(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    handler = lambda *a, **k: _Quiet(*a, directory=str(root), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_acquire_url(http_dir, tmp_path):
    root, base = http_dir
    rows = alpaca_rows(20)
    (root / "alpaca.json").write_text(json.dumps(rows))
    sha = hashlib.sha256((root / "alpaca.json").read_bytes()).hexdigest()
    got = D.acquire(f"{base}/alpaca.json", tmp_path / "raw", sha256=sha, timeout=5)
    assert got.sha256 == sha and got.path.suffix == ".json" and D.load_rows(got.path) == rows
    assert not list((tmp_path / "raw").glob(".download-*"))
    (root / "alpaca.json").unlink()  # pinned by its hash: a second acquire needs no server
    assert D.acquire(f"{base}/alpaca.json", tmp_path / "raw", sha256=sha, timeout=5) == got


def test_acquire_url_errors(http_dir, tmp_path):
    root, base = http_dir
    (root / "a.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    with pytest.raises(DataError) as err:
        D.acquire(f"{base}/a.jsonl", tmp_path / "raw", sha256="1" * 64, timeout=5)
    assert "sha256 mismatch" in _one_line_naming(err.value, f"{base}/a.jsonl") and not err.value.transient
    assert not list((tmp_path / "raw").glob(".download-*"))
    with pytest.raises(DataError, match="HTTP 404"):
        D.acquire(f"{base}/missing.json", tmp_path / "raw", timeout=5)
    url = f"http://127.0.0.1:{_free_port()}/a.json"
    started = time.monotonic()
    with pytest.raises(DataError) as err:
        D.acquire(url, tmp_path / "raw", timeout=5)
    assert time.monotonic() - started < 5
    assert "could not reach URL" in _one_line_naming(err.value, url) and err.value.transient
    started = time.monotonic()
    with pytest.raises(DataError, match="could not reach URL"):
        D.acquire(f"{base}/slow.json", tmp_path / "raw", timeout=0.5)
    assert time.monotonic() - started < 2.5


def test_hf_id_unreachable_fails_fast(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{_free_port()}")
    started = time.monotonic()
    with pytest.raises(DataError) as err:
        D.acquire("tatsu-lab/alpaca", tmp_path / "raw", timeout=5)
    assert time.monotonic() - started < 15
    msg = _one_line_naming(err.value, "tatsu-lab/alpaca")
    assert "Hugging Face Hub unreachable" in msg and "'tatsu-lab/alpaca'" in msg and err.value.transient


@needs_no_hub
def test_hf_id_with_the_real_endpoint_fails_fast_and_clearly(tmp_path):
    started = time.monotonic()
    with pytest.raises(DataError) as err:
        D.acquire("hf://qabot-tests/no-such-dataset-3f9c", tmp_path / "raw", timeout=5)
    assert time.monotonic() - started < 15
    msg = _one_line_naming(err.value, "hf://qabot-tests/no-such-dataset-3f9c")
    assert "unreachable" in msg or "not found" in msg


def test_hf_dataset_parquet_shards_become_one_jsonl(tmp_path, monkeypatch):
    import huggingface_hub
    import pandas as pd

    rows = alpaca_rows(30)
    shards = tmp_path / "hub"
    shards.mkdir()
    names = ["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet",
             "data/test-00000-of-00001.parquet", "README.md", ".gitattributes"]  # fmt: skip
    for i, name in enumerate(names[:3]):
        (shards / name.replace("/", "_")).parent.mkdir(exist_ok=True)
        pd.DataFrame(rows[i * 10 : (i + 1) * 10]).to_parquet(shards / name.replace("/", "_"))
    calls = []

    class Info:
        sha = "a" * 40
        siblings = [type("S", (), {"rfilename": n}) for n in names]

    def dataset_info(self, repo_id, revision=None, timeout=None):
        calls.append(("info", repo_id, revision))
        return Info()

    def download(repo_id, filename, **kw):
        calls.append(("get", filename, kw["revision"]))
        return str(shards / filename.replace("/", "_"))

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", dataset_info)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    got = D.acquire("hf://owner/alpaca", tmp_path / "raw")
    assert got.revision == "a" * 40 and got.path.suffix == ".jsonl"
    assert D.load_rows(got.path) == rows[:20]  # the train shards, in order
    assert [c[1] for c in calls if c[0] == "get"] == names[:2]
    calls.clear()  # pinned to that commit: served from the store, no Hub call
    assert D.acquire("owner/alpaca", tmp_path / "raw", revision="a" * 40).path == got.path and calls == []


def test_pick_data_files():
    assert D.pick_data_files(["alpaca_data_cleaned.json", "README.md", "dataset_infos.json"]) == [
        "alpaca_data_cleaned.json"
    ]
    assert D.pick_data_files(["a.json", "b.jsonl"]) == ["b.jsonl"]
    assert D.pick_data_files(["README.md"]) == []


@pytest.mark.parametrize(
    ("source", "kind"),
    [("tatsu-lab/alpaca", "hf"), ("hf://yahma/alpaca-cleaned", "hf"), ("builtin:x.jsonl", "builtin"),
     ("https://x.org/a.json", "url"), ("data/alpaca.json", "file"), ("./alpaca", "file")],
)  # fmt: skip
def test_source_kind(source, kind):
    assert D.source_kind(source) == kind


# --------------------------------------------------------------------------------------------- split/prepare


def test_split_is_deterministic_disjoint_and_never_empty():
    rows = alpaca_rows(200, seed=1)
    rows = [{**r, "output": f"{r['output']} {i}"} for i, r in enumerate(rows)]
    train, ev = D.split(rows, 0.1, seed=5)
    assert (train, ev) == D.split(rows, 0.1, seed=5) and D.split(rows, 0.1, seed=6) != (train, ev)
    assert 20 <= len(ev) < 40 and len(train) + len(ev) == 200
    assert sorted(map(str, train + ev)) == sorted(map(str, rows))
    assert len(D.split(rows[:3], 0.01, seed=0)[1]) == 1
    with pytest.raises(ValueError):
        D.split(rows[:1], 0.1, seed=0)
    same = [{"instruction": "Say hi.", "input": "", "output": o} for o in ("hi", "hello", "hey")]
    with pytest.raises(ValueError, match="same instruction"):
        D.split(same, 0.5, seed=0)


def test_split_keeps_each_instruction_and_input_on_one_side():
    """The same question with other answers (or other case, spacing, punctuation) is never both trained on
    and held out."""
    rows = []
    for k in range(60):
        q = f"What is the capital of country number {k}?"
        rows += [
            {"instruction": q, "input": "", "output": f"Capital {k}."},
            {"instruction": q.upper() + "  ", "input": "", "output": f"It is capital {k}."},
            {"instruction": "Add the two numbers.", "input": f"{k} and 1", "output": str(k + 1)},
        ]
    for seed in range(5):
        train, ev = D.split(rows, 0.2, seed=seed)
        held = {D.group_key(r) for r in ev}
        assert held and not held & {D.group_key(r) for r in train}
        assert abs(len(ev) - 0.2 * len(rows)) <= 2


def test_smoke_data_is_varied_and_held_out_from_pretraining(tmp_path):
    """The held-out split is a real held-out set: its questions are never trained on (grouped split) and never
    in the tiny models' pre-training text, which holds the world's facts (as a real base model's knowledge)
    but no question any smoke row or the smoke question set asks, and no instruction template. Every smoke
    question's fact is taught by the train split."""
    from pipeline_lib.prompts import RESPONSE_MARKER
    from pipeline_lib.questions import load_questions
    from pipeline_lib.scoring import score_answer
    from pipeline_lib.tiny import pretraining_corpus

    cfg = DataConfig(source="builtin:smoke_alpaca.jsonl", eval_fraction=0.05)
    res = D.prepare(cfg.source, tmp_path / "out", cfg)
    train = [json.loads(x) for x in Path(res.train_path).read_text(encoding="utf-8").splitlines()]
    ev = [json.loads(x) for x in Path(res.eval_path).read_text(encoding="utf-8").splitlines()]
    assert res.rows_out >= 600 and len(ev) >= 30  # varied: most of the 900 rows are distinct
    assert not {D.group_key(r) for r in ev} & {D.group_key(r) for r in train}
    corpus = "\n".join(pretraining_corpus())
    assert RESPONSE_MARKER not in corpus and "### Instruction" not in corpus
    for r in train + ev:
        assert r["instruction"] not in corpus, r
    questions = load_questions("builtin:smoke_question_set.md")
    for q in questions:
        assert q.question not in corpus
        if q.kind == "fact":  # some train row's answer states the fact this question asks for
            assert any(score_answer(q, r["output"]).correct for r in train), q.question


def _mixed_file(tmp_path: Path) -> tuple[Path, list[dict]]:
    clean = alpaca_rows(14, seed=3) + ALL_CLEAN
    defects = defective_rows()
    expected = clean + [r["expected"] for r in defects if r["action"] == "repair"]
    rows = clean + [_bare(r) for r in defects]
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return path, expected


def test_prepare_keeps_every_clean_row_and_fixes_every_defect(tmp_path):
    path, expected = _mixed_file(tmp_path)
    cfg = DataConfig(source=str(path), eval_fraction=0.1)
    res = D.prepare(str(path), tmp_path / "out", cfg)
    clean = [json.loads(line) for line in Path(res.clean_path).read_text(encoding="utf-8").splitlines()]
    assert clean == expected
    train = Path(res.train_path).read_text(encoding="utf-8").splitlines()
    ev = Path(res.eval_path).read_text(encoding="utf-8").splitlines()
    assert len(ev) == res.n_eval >= 1 and len(train) == res.n_train and res.n_train + res.n_eval == len(clean)
    assert "Москва" in Path(res.clean_path).read_text(encoding="utf-8")  # UTF-8, not \u escapes

    audit = json.loads(Path(res.audit_path).read_text())
    defects = defective_rows()
    assert audit["rows_in"] == len(expected) + sum(r["action"] == "drop" for r in defects)
    assert audit["rows_in"] == audit["rows_out"] + audit["dropped"] and audit["rows_out"] == len(expected)
    for rule in {r["rule"] for r in defects}:
        n = sum(r["rule"] == rule for r in defects)
        if audit["rules"][rule]["action"] == "drop":
            assert audit["rules"][rule]["count"] == n, rule
        else:  # some dropped rows were repaired on the way too (whitespace, placeholder inputs)
            assert audit["rules"][rule]["count"] >= n, rule
    assert audit["source"] == str(path) and audit["source_sha256"] == res.source_sha256
    assert res.source_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert res.audit_dict() == audit and (res.rows_in, res.rows_out) == (audit["rows_in"], audit["rows_out"])

    d = json.loads(json.dumps(res.to_dict()))
    assert D.PreparedData.from_dict(d) == res
    again = D.prepare(str(path), tmp_path / "out2", cfg)
    assert again.fingerprint == res.fingerprint
    other = D.prepare(str(path), tmp_path / "out3", DataConfig(source=str(path), eval_fraction=0.1, seed=1))
    assert other.fingerprint != res.fingerprint


def test_prepare_samples_max_rows_and_still_adds_up(tmp_path):
    src = write_jsonl(alpaca_sized_rows(300, seed=2, defect_fraction=0.1), tmp_path / "big.jsonl")
    res = D.prepare(str(src), tmp_path / "out", DataConfig(source=str(src), max_rows=50))
    audit = res.audit_dict()
    assert res.rows_out == 50 == audit["rows_out"] and audit["rules"]["max_rows"]["count"] > 0
    assert audit["rows_in"] == 300 == audit["rows_out"] + audit["dropped"]
    assert res.n_train + res.n_eval == 50


def test_prepare_builtin_and_errors_name_the_source(tmp_path):
    res = D.prepare(
        "builtin:smoke_alpaca.jsonl", tmp_path / "out", DataConfig(source="builtin:smoke_alpaca.jsonl")
    )
    assert res.rows_in == 900 and res.rows_out > 100 and res.source == "builtin:smoke_alpaca.jsonl"
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2")
    with pytest.raises(DataError) as err:
        D.prepare(str(bad), tmp_path / "out2", DataConfig(source=str(bad)))
    _one_line_naming(err.value, str(bad))
    useless = write_jsonl(
        [{"instruction": "Name a bird.", "input": "", "output": "N/A"}] * 3, tmp_path / "u.jsonl"
    )
    with pytest.raises(DataError, match="usable row"):
        D.prepare(str(useless), tmp_path / "out3", DataConfig(source=str(useless)))


def test_clean_is_fast_enough():
    rows = alpaca_sized_rows(10_000, seed=1)
    started = time.perf_counter()
    D.clean(rows)
    assert time.perf_counter() - started < 5  # ~0.4 s here; 52k rows must stay far under 30 s


def test_data_package_does_not_import_prefect():
    import ast

    files = sorted(Path(D.__file__).parent.glob("*.py"))
    assert {f.name for f in files} >= {"__init__.py", "sources.py", "loading.py", "rules.py", "audit.py"}
    for f in files:
        tree = ast.parse(f.read_text())
        mods = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        mods |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not any(m.split(".")[0] == "prefect" for m in mods), f.name


def test_an_interleaved_prepare_into_the_same_out_leaves_one_consistent_set(tmp_path, monkeypatch):
    """Run B starts and finishes while run A is half-way through writing: what is left is one run's set."""
    import importlib

    P = importlib.import_module("pipeline_lib.data.prepare")  # the module: `data.prepare` is the function

    a = write_jsonl(alpaca_rows(60, seed=1), tmp_path / "a.jsonl")
    b = write_jsonl(alpaca_rows(60, seed=2), tmp_path / "b.jsonl")
    out = tmp_path / "out"
    real = P._write_jsonl
    nested = []

    def write(path, rows, *args, **kwargs):
        if "train" in Path(path).name and not nested:
            nested.append(str(b))
            D.prepare(str(b), out, DataConfig(source=str(b)))  # B, from start to end
        return real(path, rows, *args, **kwargs)

    monkeypatch.setattr(P, "_write_jsonl", write)
    res = D.prepare(str(a), out, DataConfig(source=str(a)))
    audit = json.loads((out / "audit.json").read_text())
    assert audit["source"] == str(a) == res.source and nested
    data = {k: (out / f"{k}.jsonl").read_bytes() for k in ("clean", "train", "eval")}
    h = hashlib.sha256()
    for k in ("clean", "train", "eval"):
        h.update(f"{k}:{len(data[k])}:".encode() + data[k])
    assert audit["fingerprint"] == res.fingerprint == h.hexdigest()[:16]
    assert sorted(data["train"].splitlines() + data["eval"].splitlines()) == sorted(
        data["clean"].splitlines()
    )


def test_outputs_move_into_place_one_whole_set_at_a_time(tmp_path, monkeypatch):
    """Run B tries to move its outputs in while run A is between two of its moves: B waits for A's set to be
    complete, so what is left is B's whole set, never a mix."""
    import importlib

    P = importlib.import_module("pipeline_lib.data.prepare")
    a = write_jsonl(alpaca_rows(60, seed=1), tmp_path / "a.jsonl")
    b = write_jsonl(alpaca_rows(60, seed=2), tmp_path / "b.jsonl")
    out = tmp_path / "out"
    real_replace = os.replace
    b_done = threading.Event()
    b_result = []

    def run_b():
        b_result.append(D.prepare(str(b), out, DataConfig(source=str(b))))
        b_done.set()

    def replace(src, dst):
        real_replace(src, dst)
        if threading.current_thread() is threading.main_thread() and Path(dst).name == "clean.jsonl":
            threading.Thread(target=run_b, daemon=True).start()
            b_done.wait(3)  # B would finish in well under a second were nothing holding it back

    monkeypatch.setattr(P.os, "replace", replace)
    D.prepare(str(a), out, DataConfig(source=str(a)))
    assert b_done.wait(30) and b_result
    audit = json.loads((out / "audit.json").read_text())
    assert audit["source"] == str(b) and audit["fingerprint"] == b_result[0].fingerprint
    data = {k: (out / f"{k}.jsonl").read_bytes() for k in ("clean", "train", "eval")}
    h = hashlib.sha256()
    for k in ("clean", "train", "eval"):
        h.update(f"{k}:{len(data[k])}:".encode() + data[k])
    assert audit["fingerprint"] == h.hexdigest()[:16]
