"""Cleaning, deduplication, sampling, the grouped train/eval split, and `prepare` (all of it, written out).

`clean(rows, cfg)` validates each row and applies the cleaning rules in `RULES` (repairs first, then drops,
duplicates last), counting every repaired or dropped row in an `Audit`; `split` holds out an evaluation split;
`prepare(source, out_dir, cfg)` acquires, cleans and writes clean.jsonl, train.jsonl, eval.jsonl and
audit.json, returning a `PreparedData` (paths and fingerprints, JSON-able).

The outputs are written under unique temporary names and moved into place as one set under a lock on the
output directory, so concurrent runs into one directory all succeed and leave one run's complete set; a run
that fails removes whatever it created (the raw copy, new directories) and leaves what was there before.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline_lib.config import CleaningConfig, DataConfig
from pipeline_lib.data.audit import Audit
from pipeline_lib.data.errors import DataError, redact_url
from pipeline_lib.data.loading import FIELDS, Row, _write_jsonl, load_rows, validate_row
from pipeline_lib.data.rules import DUPLICATE, INVALID_ROW, NEAR_DUPLICATE, RULES, SAMPLED_OUT, _norm
from pipeline_lib.data.sources import Acquired, CreatedPaths, acquire
from pipeline_lib.files import directory_lock


def _changed_field(before: Row, after: Row) -> str:
    return next((k for k in FIELDS if before[k] != after[k]), "output")


def clean(rows: Iterable[Any], cfg: CleaningConfig | None = None) -> tuple[list[Row], Audit]:
    """Validate and clean `rows`; return the kept rows (instruction, input, output) and the audit.

    Order: invalid rows out; repairs (control characters, merged instructions, placeholder inputs); drops
    (first matching rule wins); exact then normalised duplicates (the first occurrence stays)."""
    cfg = cfg or CleaningConfig()
    audit = Audit()
    audit.add_rule(INVALID_ROW, "drop")
    for r in RULES:
        audit.add_rule(r.name, r.action, bool(getattr(cfg, r.flag)))
    audit.add_rule(DUPLICATE, "drop", cfg.drop_duplicates)
    audit.add_rule(NEAR_DUPLICATE, "drop", cfg.drop_duplicates)
    repairs = [r for r in RULES if r.action == "repair" and getattr(cfg, r.flag)]
    drops = [r for r in RULES if r.action == "drop" and getattr(cfg, r.flag)]

    kept: list[tuple[int, Row]] = []
    n = -1
    for n, obj in enumerate(rows):
        row, reason = validate_row(obj)
        if row is None:
            m = re.search(r"'(\w+)'", reason or "")
            where = m.group(1) if m else "row"
            shown = obj.get(where) if isinstance(obj, Mapping) and where in obj else None
            audit.record(INVALID_ROW, n, where, None if shown is None else str(shown), reason=reason)
            continue
        for rule in repairs:
            new = rule.fn(row)
            if new is not None:
                f = rule.field or _changed_field(row, new)
                audit.record(rule.name, n, f, row[f], new[f])
                row = new
        for rule in drops:
            if rule.fn(row):
                audit.record(rule.name, n, rule.field, row[rule.field])
                break
        else:
            kept.append((n, row))
    audit.rows_in = n + 1

    if cfg.drop_duplicates:
        kept = _dedupe(kept, audit)
    audit.rows_out = len(kept)
    if audit.rows_in != audit.rows_out + audit.dropped:  # pragma: no cover - an internal invariant
        raise AssertionError(f"audit does not add up: {audit.to_dict()}")
    return [r for _, r in kept], audit


def _dedupe(kept: list[tuple[int, Row]], audit: Audit) -> list[tuple[int, Row]]:
    """Drop exact, then normalised duplicates. Outputs (the long part) are normalised only for rows whose
    normalised instruction and input collide with an earlier row's."""
    exact: dict[tuple[str, str, str], int] = {}
    normal: dict[tuple[str, str], list[list[Any]]] = {}  # (instruction, input) -> [[row no, output, norm]]
    out = []
    for n, row in kept:
        key = (row["instruction"], row["input"], row["output"])
        if key in exact:
            audit.record(DUPLICATE, n, "instruction", row["instruction"], of=exact[key])
            continue
        io = (_norm(key[0]), _norm(key[1]))
        seen = normal.get(io)
        if seen is None:
            normal[io] = [[n, key[2], None]]
        else:
            nout = _norm(key[2])
            first = None
            for entry in seen:
                if entry[2] is None:
                    entry[2] = _norm(entry[1])
                if entry[2] == nout:
                    first = entry[0]
                    break
            if first is not None:
                audit.record(NEAR_DUPLICATE, n, "instruction", row["instruction"], of=first)
                continue
            seen.append([n, key[2], nout])
        exact[key] = n
        out.append((n, row))
    return out


def sample_rows(rows: list[Row], max_rows: int, seed: int, audit: Audit | None = None) -> list[Row]:
    """A seeded sample of `max_rows` rows, in their original order (all of them when there are fewer)."""
    if len(rows) <= max_rows:
        return rows
    keep = sorted(random.Random(seed).sample(range(len(rows)), max_rows))
    if audit is not None:
        audit.add_rule(SAMPLED_OUT, "drop")
        audit.rules[SAMPLED_OUT].count += len(rows) - max_rows
        audit.rows_out = max_rows
    return [rows[i] for i in keep]


def group_key(row: Mapping[str, Any]) -> str:
    """What makes two rows "the same task": the normalised instruction and input (case, spacing and
    punctuation ignored). Rows sharing it always land on the same side of the train/eval split, so the same
    question with another answer can never be trained on and then evaluated as held out."""
    return _norm(row["instruction"]) + "\x1f" + _norm(row.get("input") or "")


def split(rows: list[Row], eval_fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """(train, eval): whole groups of rows (`group_key`) held out until `eval_fraction` of the rows (at least
    one group) is reached; the groups are taken in a seeded random order. Both sides keep file order, and
    neither is ever empty."""
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be between 0 and 1, got {eval_fraction}")
    n = len(rows)
    if n < 2:
        raise ValueError(f"need at least 2 rows to split into train and eval, got {n}")
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(group_key(r), []).append(i)
    if len(groups) < 2:
        raise ValueError(
            f"all {n} rows ask the same instruction and input; need at least 2 distinct ones to hold one out"
        )
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    target = max(1, round(n * eval_fraction))
    held: set[int] = set()
    for key in keys[:-1]:  # the last group always stays in training
        if len(held) >= target:
            break
        if held and len(held) + len(groups[key]) > n - 1:
            continue
        held.update(groups[key])
    train = [r for i, r in enumerate(rows) if i not in held]
    ev = [r for i, r in enumerate(rows) if i in held]
    return train, ev


# --------------------------------------------------------------------------------------------------- prepare


@dataclass(frozen=True)
class PreparedData:
    """The prepared data set as paths (absolute, as strings) and fingerprints: JSON-able, passed between stages.

    `fingerprint` hashes the content of clean.jsonl, train.jsonl and eval.jsonl: identical input and settings
    give the same fingerprint on every run."""

    clean_path: str
    train_path: str
    eval_path: str
    audit_path: str
    fingerprint: str
    source: str
    source_sha256: str
    revision: str | None
    rows_in: int
    rows_out: int
    n_train: int
    n_eval: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PreparedData:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})

    def audit_dict(self) -> dict[str, Any]:
        """The audit written next to the data (audit.json)."""
        return json.loads(Path(self.audit_path).read_text(encoding="utf-8"))


_OUTPUTS = ("clean.jsonl", "train.jsonl", "eval.jsonl", "audit.json")


def _staged(out: Path, name: str) -> Path:
    """A unique temporary file in `out` for the output `name` (hidden, removed if the call fails)."""
    fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{name}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


def _fingerprint(files: Iterable[tuple[str, Path]]) -> str:
    h = hashlib.sha256()
    for key, path in files:
        h.update(f"{key}:{path.stat().st_size}:".encode())
        with path.open("rb") as f:
            for piece in iter(lambda: f.read(1 << 20), b""):
                h.update(piece)
    return h.hexdigest()[:16]


def clean_acquired(
    acquired: Acquired | Mapping[str, Any],
    out_dir: str | os.PathLike,
    cfg: DataConfig,
    *,
    created: CreatedPaths | None = None,
) -> PreparedData:
    """Load, clean, sample, split and write an acquired file into `out_dir` (see `prepare`).

    The outputs are written under unique temporary names and moved into place together, under a lock on
    `out_dir`, only when all of them are complete: a failure leaves `out_dir` as it was, and concurrent calls
    into one `out_dir` each leave a complete, consistent set (the last one's)."""
    acq = acquired if isinstance(acquired, Acquired) else Acquired.from_dict(acquired)
    source = redact_url(acq.source)
    out = Path(out_dir).resolve()
    raw = load_rows(acq.path, name=source)
    rows, audit = clean(raw, cfg.cleaning)
    del raw
    if cfg.max_rows is not None:
        rows = sample_rows(rows, cfg.max_rows, cfg.seed, audit)
    if len(rows) < 2:
        raise DataError(
            source, f"only {len(rows)} usable row(s) left after cleaning {audit.rows_in}; need at least 2"
        )
    train, ev = split(rows, cfg.eval_fraction, cfg.seed)
    (created if created is not None else CreatedPaths()).mkdirs(out)
    staged: dict[str, Path] = {}
    try:
        for key, part in (("clean", rows), ("train", train), ("eval", ev)):
            staged[f"{key}.jsonl"] = tmp = _staged(out, f"{key}.jsonl")
            _write_jsonl(tmp, part)
        fp = _fingerprint((k, staged[f"{k}.jsonl"]) for k in ("clean", "train", "eval"))
        report = {
            **audit.to_dict(),
            "source": source,
            "source_sha256": acq.sha256,
            "revision": acq.revision,
            "fingerprint": fp,
            "n_train": len(train),
            "n_eval": len(ev),
            "settings": cfg.model_dump(mode="json", exclude={"source"}),
        }
        staged["audit.json"] = tmp = _staged(out, "audit.json")
        # a lone surrogate in an example (from rows given as objects) is written as its \\u escape: still JSON
        text = json.dumps(report, indent=2, ensure_ascii=False) + "\n"
        tmp.write_bytes(text.encode("utf-8", errors="backslashreplace"))
        with directory_lock(out):  # concurrent prepares into one directory: one whole set at a time
            for name in _OUTPUTS:
                os.replace(staged.pop(name), out / name)
    finally:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
    return PreparedData(
        clean_path=str(out / "clean.jsonl"),
        train_path=str(out / "train.jsonl"),
        eval_path=str(out / "eval.jsonl"),
        audit_path=str(out / "audit.json"),
        fingerprint=fp,
        source=source,
        source_sha256=acq.sha256,
        revision=acq.revision,
        rows_in=audit.rows_in,
        rows_out=len(rows),
        n_train=len(train),
        n_eval=len(ev),
    )


def prepare(
    source: str, out_dir: str | os.PathLike, cfg: DataConfig, *, cache_dir: str | os.PathLike | None = None
) -> PreparedData:
    """Acquire `source` (into `cache_dir`, default `out_dir/raw`), then load, validate, clean, optionally sample
    `cfg.max_rows`, split, and write `out_dir/clean.jsonl`, `train.jsonl`, `eval.jsonl` and `audit.json`.

    Raises `DataError` (one line naming the source, its secrets redacted, and the problem) when the data cannot
    be used; everything this call created (the raw copy, directories) is removed again, and what was in
    `out_dir` before stays as it was."""
    if not str(out_dir).strip():
        raise ValueError("out_dir is empty; give the directory to write the prepared data to")
    out = Path(out_dir)
    made = CreatedPaths()
    try:
        acquired = acquire(
            source,
            Path(cache_dir) if cache_dir is not None else out / "raw",
            revision=cfg.revision,
            sha256=cfg.sha256,
            max_mb=cfg.max_download_mb,
            deadline_s=cfg.download_timeout_s,
            created=made,
        )
        return clean_acquired(acquired, out, cfg, created=made)
    except BaseException:
        made.remove()
        raise
