"""Benchmark of the data stage on an Alpaca-sized set (52,000 rows, ~3% defective).

    .venv/bin/python benchmarks/bench_data.py [--rows 52000] [--no-naive] [--no-tokenize] [--json out.json]

Times `pipeline_lib.data.prepare` (acquire, load, validate, clean, split, write) against a row-at-a-time
baseline measured in the same run: one pass over the data per rule, each pass re-reading and re-writing the
JSON file, regexes given as pattern strings at each call, and duplicates found by searching a list (O(n^2)).
When `pipeline_lib.tokenization.tokenize_split` is available, it also times tokenizing the train split with
each tiny tokenizer (`tiny:llama`, `tiny:bloom`, `tiny:falcon`).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipeline_lib import data as D  # noqa: E402
from pipeline_lib.config import DataConfig  # noqa: E402
from pipeline_lib.prompts import build_prompt  # noqa: E402
from pipeline_lib.synthetic import alpaca_sized_rows  # noqa: E402

# ------------------------------------------------------------------------------------- row-at-a-time baseline


def _naive_text(s: str) -> str:
    s = re.sub(r"\r\n?", "\n", s)
    s = re.sub(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufeff\ud800-\udfff]", "", s)
    if "\\" in s and not re.search(
        r"[{};=<>]|\w\(|^\s*(?:def|class|import|return|print)\b|\n(?: {2,}|\t)\S", s, re.M
    ):
        s = re.sub(r"\A(?:\\[nrt])+(?=[A-Z0-9\"'(*\u2022-])", "", s)
        s = re.sub(r"(?<=[.!?)\]\"'])(?:\\[nrt])+\Z", "", s)
        s = re.sub(r"(?<=[.!?)\]\"'])(?:\\r)?\\n(?=(?:\\r)?\\n|[A-Z0-9\"'(*\u2022-])", "\n", s)
        s = re.sub(r"\\([\"'])", r"\1", s)
    return s.strip()


def _naive_passes() -> list:
    """The same rules as `pipeline_lib.data`, written the straightforward way."""

    def control_chars(row):
        return {k: _naive_text(v) for k, v in row.items()}

    def merged(row):
        for k in list(row):
            m = re.search(
                r"(?:\A|\s*\n)[ \t]*#{2,}[ \t]*(?:\n\s*(?:\d+\s*\.\s*)?(?:instruction|input|output)\s*:|\s*\Z)",
                row[k],
                re.I,
            )
            if m:
                row[k] = row[k][: m.start()].rstrip()
        return row

    def empty_input(row):
        if re.fullmatch(D._EMPTY_INPUT.pattern, row["input"].strip(), re.I):
            row["input"] = ""
        return row

    def drop_if(pred):
        return lambda row: None if pred(row) else row

    return [
        control_chars,
        merged,
        empty_input,
        drop_if(lambda r: not r["output"].strip()),
        drop_if(lambda r: re.fullmatch(D._NOOUTPUT.pattern, r["output"].strip(), re.I) is not None
                or re.match(D._CANNOT_GPT.pattern, r["output"].strip(), re.I) is not None
                or re.match(D._CANNOT_MEDIA.pattern, r["output"].strip(), re.I) is not None),
        drop_if(lambda r: re.fullmatch(D._NA.pattern, r["output"].strip(), re.I) is not None
                and re.search(D._NA_TOPIC.pattern, r["instruction"], re.I) is None),
        drop_if(lambda r: len(re.findall(r"[^\W\d_]", r["instruction"])) < 2
                or re.fullmatch(D._PLACEHOLDER_ONLY.pattern, r["instruction"].strip(), re.I) is not None),
        drop_if(lambda r: not r["input"].strip()
                and re.search(D._MISSING_INPUT.pattern, r["instruction"].strip(), re.I) is not None),
        drop_if(lambda r: re.fullmatch(D._PLACEHOLDER_INPUT.pattern, r["input"].strip(), re.I) is not None
                or (re.fullmatch(D._URL_ONLY.pattern, r["input"].strip(), re.I) is not None
                    and (re.search(D._URL_STRING_TASK.pattern, r["instruction"], re.I) is None
                         or re.search(D._URL_CONTENT_TASK.pattern, r["instruction"], re.I) is not None))
                or re.search(D._PLACEHOLDER_IN_TEXT.pattern, r["instruction"] + "\n" + r["input"], re.I)
                is not None),
        drop_if(lambda r: re.search(D._CODE_REQUEST.pattern, r["instruction"], re.I) is not None
                and re.search(D._HAS_CODE.pattern, r["output"], re.M | re.I) is None),
    ]  # fmt: skip


def naive_prepare(src: Path, work: Path) -> tuple[int, dict[str, float]]:
    """Clean `src` one rule at a time, reading and writing the whole file around each pass."""
    times: dict[str, float] = {}
    started = time.perf_counter()
    rows = json.loads(src.read_text(encoding="utf-8"))
    valid = []
    for r in rows:
        if isinstance(r.get("instruction"), str) and isinstance(r.get("output"), str):
            inp = r.get("input") or ""
            if isinstance(inp, str):
                valid.append({"instruction": r["instruction"], "input": inp, "output": r["output"]})
    stage = work / "stage.json"
    stage.write_text(json.dumps(valid, ensure_ascii=False), encoding="utf-8")
    for step in _naive_passes():
        rows = json.loads(stage.read_text(encoding="utf-8"))
        out = []
        for row in rows:
            new = step(dict(row))
            if new is not None:
                out.append(new)
        stage.write_text(json.dumps(out, ensure_ascii=False), encoding="utf-8")
    times["rule passes"] = time.perf_counter() - started

    t0 = time.perf_counter()
    rows = json.loads(stage.read_text(encoding="utf-8"))
    seen: list[tuple[str, str, str]] = []
    seen_norm: list[tuple[str, str, str]] = []
    kept = []
    for row in rows:
        key = (row["instruction"], row["input"], row["output"])
        if key in seen:
            continue
        norm = tuple(re.sub(D._NORM.pattern, " ", v.casefold()).strip() for v in key)
        if norm in seen_norm:
            continue
        seen.append(key)
        seen_norm.append(norm)
        kept.append(row)
    times["list dedupe"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    (work / "clean.json").write_text(json.dumps(kept, ensure_ascii=False), encoding="utf-8")
    times["write"] = time.perf_counter() - t0
    return len(kept), times


# ------------------------------------------------------------------------------------------------------ main


def _pct(xs: list[int], q: float) -> int:
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=52_000)
    ap.add_argument("--defects", type=float, default=0.03, help="share of rows with a known defect")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="working directory (default: a temporary one)")
    ap.add_argument("--no-naive", action="store_true", help="skip the row-at-a-time baseline")
    ap.add_argument("--no-tokenize", action="store_true", help="skip tokenization timings")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)

    tmp = None
    if args.out is None:
        tmp = tempfile.TemporaryDirectory(prefix="qabot-bench-data-")
        args.out = Path(tmp.name)
    work = args.out
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"rows": args.rows, "defect_fraction": args.defects}

    t0 = time.perf_counter()
    injected: dict[str, int] = {}
    rows = alpaca_sized_rows(args.rows, seed=args.seed, defect_fraction=args.defects, counts=injected)
    src = work / "alpaca_data.json"
    src.write_text(json.dumps(rows, ensure_ascii=False, indent=4), encoding="utf-8")
    lengths = sorted(
        len(build_prompt(r["instruction"], r["input"] or "")) + len(r["output"])
        for r in rows
        if isinstance(r.get("instruction"), str) and isinstance(r.get("output"), str)
    )
    print(f"data: {args.rows:,} rows, {src.stat().st_size / 1e6:.1f} MB, {sum(injected.values()):,} with a defect "
          f"(made in {time.perf_counter() - t0:.1f} s)")  # fmt: skip
    print(f"  characters with the prompt template: mean {statistics.fmean(lengths):.0f}, "
          f"median {_pct(lengths, 0.5)}, p90 {_pct(lengths, 0.9)}, p99 {_pct(lengths, 0.99)}, max {lengths[-1]}")  # fmt: skip
    results["chars"] = {"mean": statistics.fmean(lengths), "p99": _pct(lengths, 0.99), "max": lengths[-1]}

    cfg = DataConfig(source=str(src))
    t0 = time.perf_counter()
    prepared = D.prepare(str(src), work / "prepared", cfg)
    fast = time.perf_counter() - t0
    audit = prepared.audit_dict()
    print(f"prepare: {fast:.2f} s  ({prepared.rows_in:,} in, {prepared.rows_out:,} out, "
          f"{audit['dropped']:,} dropped, {audit['repaired']:,} repaired; {prepared.rows_in / fast:,.0f} rows/s)")  # fmt: skip
    for name, s in audit["rules"].items():
        if s["count"]:
            print(f"  {name:<20} {s['action']:<7} {s['count']:>6}   injected {injected.get(name, 0)}")
    results["prepare_s"] = fast
    results["rows_out"] = prepared.rows_out

    if not args.no_naive:
        naive_dir = work / "naive"
        naive_dir.mkdir(exist_ok=True)
        print(
            "row-at-a-time baseline: running (its list-based dedupe takes minutes at 52k rows)...", flush=True
        )
        t0 = time.perf_counter()
        n_kept, parts = naive_prepare(src, naive_dir)
        slow = time.perf_counter() - t0
        detail = ", ".join(f"{k} {v:.1f} s" for k, v in parts.items())
        same = "same as prepare" if n_kept == prepared.rows_out else f"prepare kept {prepared.rows_out:,}"
        print(f"row-at-a-time baseline: {slow:.2f} s  ({n_kept:,} rows out, {same}; {detail})")
        print(f"speed-up: {slow / fast:.1f}x")
        results.update(naive_s=slow, naive_rows_out=n_kept, naive_parts=parts, speedup=slow / fast)

    if not args.no_tokenize:
        results["tokenize"] = bench_tokenize(prepared, work, args.max_length)

    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if tmp is not None:
        tmp.cleanup()
    return 0


def bench_tokenize(prepared: D.PreparedData, work: Path, max_length: int) -> dict:
    """Time `tokenization.tokenize_split` on the train split with each tiny tokenizer, where it exists."""
    try:
        from pipeline_lib.tokenization import tokenize_split
    except ImportError:
        print("tokenization: pipeline_lib.tokenization.tokenize_split not available; skipped")
        return {}
    from pipeline_lib.tiny import ARCHS, materialize_tiny

    out: dict = {}
    for arch in ARCHS:
        try:
            tok_dir, _ = materialize_tiny(f"tiny:{arch}", work / "tiny")
            t0 = time.perf_counter()
            stats = tokenize_split(prepared.train_path, tok_dir, max_length, work / "tokenized" / arch)
            secs = time.perf_counter() - t0
        except Exception as err:  # noqa: BLE001 - report and go on with the other tokenizers
            print(f"tokenize tiny:{arch}: failed: {type(err).__name__}: {err}")
            out[arch] = {"error": str(err)}
            continue
        n = stats.get("n_rows", prepared.n_train)
        print(f"tokenize tiny:{arch}: {secs:.2f} s ({n / secs:,.0f} rows/s), lengths {stats.get('lengths')}, "
              f"truncated {stats.get('n_truncated')}, dropped {stats.get('n_dropped')}")  # fmt: skip
        out[arch] = {"seconds": secs, **{k: stats.get(k) for k in ("n_rows", "lengths", "n_truncated")}}
    return out


if __name__ == "__main__":
    raise SystemExit(main())
