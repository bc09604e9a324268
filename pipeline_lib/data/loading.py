"""Reading data files: JSON arrays, JSON Lines and Parquet into row objects, and one row's validation.

`load_rows(path)` raises `DataError` for whole-file problems only; `validate_row` says what is wrong with a
single row (`clean` counts such rows in its audit). JSON Lines are also written here (`_write_jsonl`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pipeline_lib.data.sources import DataError

Row = dict[str, str]
FIELDS = ("instruction", "input", "output")


def load_rows(path: str | os.PathLike, *, name: str | None = None) -> list[dict]:
    """The row objects of a JSON array, JSON Lines or Parquet file; problems are named after `name` (or path).

    Raises `DataError` for whole-file problems only: missing, empty, binary, not UTF-8, not JSON/JSONL, top
    level not a list of objects, a JSONL line that is not an object, or no row with the Alpaca fields.
    Rows are returned as read; `clean` validates each one."""
    p = Path(path)
    where = name or str(p)
    if not p.exists():
        raise DataError(where, "file not found")
    if not p.is_file():
        raise DataError(where, "not a file")
    data = p.read_bytes()
    if not data.strip():
        raise DataError(where, "file is empty")
    if data[:4] == b"PAR1":
        rows = _read_parquet(p, where)
    else:
        if b"\x00" in data:
            raise DataError(where, "binary file, not JSON or JSON Lines text")
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as err:
            raise DataError(
                where, f"not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start})"
            ) from None
        rows = _parse_text(text, where)
    if not rows:
        raise DataError(where, "contains no rows")
    if not any("instruction" in r and "output" in r for r in rows):
        keys = sorted({k for r in rows[:100] for k in r})[:8]
        raise DataError(
            where,
            "no rows with the Alpaca fields 'instruction' and 'output'"
            + (f" (found: {', '.join(map(str, keys))})" if keys else ""),
        )
    return rows


def _kind(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), "a number"
    )


def _parse_text(text: str, where: str) -> list[dict]:
    first = text.lstrip()[:1]
    if first == "{":
        rows: list[dict] = []
        lines = text.split("\n")
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                whole = _try_json(text)
                if isinstance(whole, dict):
                    raise DataError(
                        where, "top level is a single JSON object, not a list of row objects"
                    ) from None
                raise DataError(
                    where, f"not valid JSON Lines (line {i}, column {err.colno}: {err.msg})"
                ) from None
            if not isinstance(obj, dict):
                raise DataError(where, f"line {i} is {_kind(obj)}, not a JSON object")
            rows.append(obj)
        return rows
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(where, f"not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
    if not isinstance(obj, list):
        raise DataError(where, f"top level is {_kind(obj)}, not a list of row objects")
    for i, item in enumerate(obj):
        if not isinstance(item, dict):
            raise DataError(where, f"item {i} of the top-level list is {_kind(item)}, not an object")
    return obj


def _try_json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _read_parquet(path: Path, where: str) -> list[dict]:
    import pandas as pd

    try:
        df = pd.read_parquet(path)
    except Exception as err:  # noqa: BLE001 - a corrupt file is a data problem
        raise DataError(where, f"not a readable Parquet file ({type(err).__name__}: {err})") from None
    rows = df.to_dict("records")
    for r in rows:  # pandas gives NaN/None for missing cells; keep JSON semantics
        for k, v in list(r.items()):
            if isinstance(v, float) and v != v:
                r[k] = None
    return rows


def validate_row(obj: Any) -> tuple[Row | None, str | None]:
    """(row with exactly instruction/input/output as strings, None) or (None, why it is unusable)."""
    if not isinstance(obj, Mapping):
        return None, f"row is {_kind(obj)}, not an object"
    for key in ("instruction", "output"):
        if key not in obj:
            return None, f"missing {key!r}"
        if not isinstance(obj[key], str):
            return None, f"{key!r} is {_kind(obj[key])}, not a string"
    inp = obj.get("input")
    if inp is None:
        inp = ""
    elif not isinstance(inp, str):
        return None, f"'input' is {_kind(inp)}, not a string"
    return {"instruction": obj["instruction"], "input": inp, "output": obj["output"]}, None


def _jsonl_bytes(rows: Iterable[Mapping[str, Any]], fields: tuple[str, ...] | None = FIELDS) -> bytes:
    dumps = json.dumps
    if fields is None:
        text = "".join(dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows)
    else:
        text = "".join(dumps({k: r[k] for k in fields}, ensure_ascii=False) + "\n" for r in rows)
    return text.encode("utf-8", errors="replace")


def _write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _write_jsonl(
    path: Path, rows: Iterable[Mapping[str, Any]], fields: tuple[str, ...] | None = FIELDS
) -> bytes:
    data = _jsonl_bytes(rows, fields)
    _write_bytes(path, data)
    return data
