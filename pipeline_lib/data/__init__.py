"""Instruction data: acquire, load, validate, clean with named rules (audited), split, prepare.

Stages, each a plain function, each in a module of its own:

- `sources`: `acquire(source, dest_dir)` fetches a local file, a shipped `builtin:NAME`, an http(s) URL or a
  Hugging Face dataset into `dest_dir/<sha256[:16]>/raw.<ext>` (content-addressed, so a repeated acquire
  copies nothing), returning an `Acquired`; every problem is a one-line `DataError`; `redact_url` hides the
  secrets of a source URL in whatever is recorded or shown;
- `download`: one http(s) download within a size cap and a deadline, redirected only to public addresses;
- `loading`: `load_rows(path)` reads a JSON array or JSON Lines file (or Parquet); whole-file problems raise
  `DataError`; `validate_row` checks one row;
- `rules`: the cleaning rules (`RULES`), each a small named function with its switch and field;
- `audit`: what cleaning did, per rule (`Audit`, `audit_table`);
- `prepare`: `clean(rows, cfg)` validates each row and applies the rules (repairs first, then drops,
  duplicates last); `split(rows, eval_fraction, seed)` holds out an evaluation split; `prepare(source,
  out_dir, cfg)` does all of it and writes clean.jsonl, train.jsonl, eval.jsonl and audit.json, returning a
  `PreparedData` (paths and fingerprints, JSON-able).

The rules cover the known defects of the original Alpaca set (docs: data notes): hallucination bait, merged
instructions, empty outputs, empty code answers, `<nooutput>` answers, `N/A` answers, placeholder inputs,
unclear instructions and stray control/escape characters, plus exact and normalised duplicates. They are
deliberately narrow: a clean row, in any language, is never changed or dropped.

Everything callers use is importable from `pipeline_lib.data` itself.
"""

from __future__ import annotations

from pipeline_lib.data.audit import Audit, RuleStats, audit_table
from pipeline_lib.data.loading import FIELDS, Row, load_rows, validate_row
from pipeline_lib.data.prepare import (
    PreparedData,
    clean,
    clean_acquired,
    group_key,
    prepare,
    sample_rows,
    split,
)
from pipeline_lib.data.rules import (
    DUPLICATE,
    INVALID_ROW,
    NEAR_DUPLICATE,
    RULES,
    SAMPLED_OUT,
    Rule,
    drop_empty_code,
    drop_empty_output,
    drop_hallucination_bait,
    drop_missing_input,
    drop_na_output,
    drop_nooutput,
    drop_unclear_instruction,
    repair_control_chars,
    repair_empty_input,
    repair_merged_instruction,
    rule_names,
)
from pipeline_lib.data.sources import (
    BUILTIN_PREFIX,
    DATA_SUFFIXES,
    HF_PREFIX,
    Acquired,
    CreatedPaths,
    DataError,
    SourceKind,
    acquire,
    pick_data_files,
    redact_url,
    source_kind,
    unsupported_scheme,
)

# isort: split
# The private patterns, for benchmarks/bench_data.py's row-at-a-time baseline.
from pipeline_lib.data.rules import (  # noqa: F401
    _CANNOT_GPT,
    _CANNOT_MEDIA,
    _CODE_REQUEST,
    _EMPTY_INPUT,
    _HAS_CODE,
    _MISSING_INPUT,
    _NA,
    _NA_TOPIC,
    _NOOUTPUT,
    _NORM,
    _PLACEHOLDER_IN_TEXT,
    _PLACEHOLDER_INPUT,
    _PLACEHOLDER_ONLY,
    _URL_CONTENT_TASK,
    _URL_ONLY,
    _URL_STRING_TASK,
)

__all__ = [
    "BUILTIN_PREFIX",
    "DATA_SUFFIXES",
    "DUPLICATE",
    "FIELDS",
    "HF_PREFIX",
    "INVALID_ROW",
    "NEAR_DUPLICATE",
    "RULES",
    "SAMPLED_OUT",
    "Acquired",
    "Audit",
    "CreatedPaths",
    "DataError",
    "PreparedData",
    "Row",
    "Rule",
    "RuleStats",
    "SourceKind",
    "acquire",
    "audit_table",
    "clean",
    "clean_acquired",
    "drop_empty_code",
    "drop_empty_output",
    "drop_hallucination_bait",
    "drop_missing_input",
    "drop_na_output",
    "drop_nooutput",
    "drop_unclear_instruction",
    "group_key",
    "load_rows",
    "pick_data_files",
    "prepare",
    "redact_url",
    "repair_control_chars",
    "repair_empty_input",
    "repair_merged_instruction",
    "rule_names",
    "sample_rows",
    "source_kind",
    "split",
    "unsupported_scheme",
    "validate_row",
]
