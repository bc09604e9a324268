"""Reading data files: JSON arrays, JSON Lines and Parquet into row objects, and one row's validation.

`load_rows(path)` raises `DataError` for whole-file problems only; `validate_row` says what is wrong with a
single row (`clean` counts such rows in its audit). JSON Lines are also written here (`_write_jsonl`).
"""

from __future__ import annotations

import json
import json.scanner
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pipeline_lib.data.errors import DataError

Row = dict[str, str]
FIELDS = ("instruction", "input", "output")


_PIECE = 1 << 20  # bytes read at a time when checking a file
_TEXT_PIECE = 1 << 16  # characters read at a time when parsing a JSON array (the buffer stays small)
_BOM = b"\xef\xbb\xbf"
_BLANK = b" \t\n\r\x0b\x0c"
_WS = re.compile(r"[ \t\n\r]*")  # JSON whitespace
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def load_rows(path: str | os.PathLike, *, name: str | None = None) -> list[dict]:
    """The row objects of a JSON array, JSON Lines or Parquet file; problems are named after `name` (or path).

    Raises `DataError` for whole-file problems only: missing, empty, binary, not UTF-8, not JSON/JSONL, top
    level not a list of objects, a JSONL line that is not an object, a lone surrogate escape (`"\\ud800"`:
    not Unicode text, it could not be written back), or no row with the Alpaca fields. Rows are returned as
    read; `clean` validates each one.

    JSON Lines are read line by line and JSON arrays item by item, with the keys shared between rows, so
    loading takes little more memory than the rows themselves (under twice the file's size for Alpaca-like
    rows), never a copy of the whole file."""
    p = Path(path)
    where = name or str(p)
    if not p.exists():
        raise DataError(where, "file not found")
    if not p.is_file():
        raise DataError(where, "not a file")
    with p.open("rb") as f:
        head = f.read(4)
    if head == b"PAR1":
        rows = _read_parquet(p, where)
    else:
        first = _check_text(p, where)
        rows = _parse_jsonl(p, where) if first == "{" else _parse_json(p, where)
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


def _check_text(p: Path, where: str) -> str:
    """One pass over the file in pieces: not empty, no NUL byte, valid UTF-8. Returns its first character
    that is not whitespace ('' when there is none)."""
    blank = True
    bad: DataError | None = None  # a NUL byte anywhere wins over a UTF-8 error (as "binary")
    first = ""
    carry = b""
    offset = 0  # file offset of carry[0]
    with p.open("rb") as f:
        if f.read(len(_BOM)) == _BOM:
            offset = len(_BOM)
            blank = False  # as before: a BOM alone is not an empty file
        else:
            f.seek(0)
        while True:
            piece = f.read(_PIECE)
            if b"\x00" in piece:
                raise DataError(where, "binary file, not JSON or JSON Lines text")
            if blank and piece.strip(_BLANK):
                blank = False
            data = carry + piece
            if bad is None:
                try:
                    text = data.decode("utf-8")
                    carry = b""
                except UnicodeDecodeError as err:
                    if piece and err.reason == "unexpected end of data" and err.start >= len(data) - 3:
                        text, carry = data[: err.start].decode("utf-8"), data[err.start :]
                    else:
                        bad = DataError(
                            where,
                            f"not UTF-8 text (byte 0x{data[err.start]:02x} at offset {offset + err.start})",
                        )
                        text, carry = "", b""
                if not first:
                    first = text.lstrip()[:1]
                offset += len(data) - len(carry)
            if not piece:
                break
    if blank:
        raise DataError(where, "file is empty")
    if bad is not None:
        raise bad
    return first


def _kind(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), "a number"
    )


def _shared_keys(obj: dict, keys: dict[str, str]) -> dict:
    """`obj` with its keys replaced by one shared copy of each: a row of 3 short fields then costs about half."""
    return {keys.setdefault(k, k): v for k, v in obj.items()}


def _lone_surrogate(obj: Any, at: str = "") -> str | None:
    """Where in `obj` a string holds a lone surrogate, and which: "'instruction' (\\ud800)"; None if nowhere."""
    if isinstance(obj, str):
        m = _LONE_SURROGATE.search(obj)
        return f"{at or 'a string'} (\\u{ord(m.group()):04x})" if m else None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        key = f"{at}[{k!r}]" if at else repr(k)
        hit = _lone_surrogate(k, f"a key of {at or 'the row'}") if isinstance(k, str) else None
        hit = hit or _lone_surrogate(v, key)
        if hit:
            return hit
    return None


def _surrogate_error(where: str, at: str, obj: Any) -> DataError | None:
    hit = _lone_surrogate(obj)
    if hit is None:
        return None
    return DataError(
        where, f"{at}: lone surrogate in {hit}, not valid Unicode text; fix or remove that escape"
    )


def _parse_jsonl(p: Path, where: str) -> list[dict]:
    rows: list[dict] = []
    keys: dict[str, str] = {}
    loads = json.loads
    with p.open("rb") as f:
        for i, raw in enumerate(f, 1):
            line = raw.decode("utf-8").removesuffix("\n")  # checked already
            if i == 1:
                line = line.removeprefix("\ufeff")
            if not line.strip():
                continue
            try:
                obj = loads(line)
            except json.JSONDecodeError as err:
                if not rows and isinstance(_try_json(p), dict):  # the first row: maybe one pretty object
                    raise DataError(
                        where, "top level is a single JSON object, not a list of row objects"
                    ) from None
                raise DataError(
                    where, f"not valid JSON Lines (line {i}, column {err.colno}: {err.msg})"
                ) from None
            if not isinstance(obj, dict):
                raise DataError(where, f"line {i} is {_kind(obj)}, not a JSON object")
            if "\\u" in line and _SURROGATE_ESCAPE.search(line):
                if bad := _surrogate_error(where, f"line {i}", obj):
                    raise bad
            rows.append(_shared_keys(obj, keys))
    return rows


class _TextReader:
    """A JSON text read in pieces into a buffer, with line/column positions for error messages."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.buf = ""
        self.eof = False
        self.lines_before = 0  # newlines in the text dropped from the buffer
        self.col_before = 0  # characters after the last of them

    def more(self, at_least: int = 0) -> bool:
        if self.eof:
            return False
        piece = self.f.read(max(at_least, _TEXT_PIECE))
        if not piece:
            self.eof = True
            return False
        self.buf += piece
        return True

    def drop(self, pos: int) -> int:
        """Forget the buffer before `pos` (returns the new position: 0)."""
        if pos:
            nl = self.buf.count("\n", 0, pos)
            last = self.buf.rfind("\n", 0, pos)
            self.lines_before += nl
            self.col_before = pos - last - 1 if last >= 0 else self.col_before + pos
            self.buf = self.buf[pos:]
        return 0

    def skip_ws(self, pos: int) -> int:
        while True:
            pos = _WS.match(self.buf, pos).end()
            if pos < len(self.buf) or not self.more():
                return pos

    def where(self, pos: int) -> tuple[int, int]:
        nl = self.buf.count("\n", 0, pos)
        if nl:
            return self.lines_before + nl + 1, pos - self.buf.rfind("\n", 0, pos)
        return self.lines_before + 1, self.col_before + pos + 1

    def error(self, where: str, pos: int, msg: str) -> DataError:
        line, col = self.where(pos)
        return DataError(where, f"not valid JSON (line {line}, column {col}: {msg})")


def _parse_json(p: Path, where: str) -> list[dict]:
    """A top-level JSON array, parsed item by item; anything else as a whole (to say what it is)."""
    scan = json.scanner.make_scanner(json.JSONDecoder())  # one value at an index: (value, end)
    rows: list[dict] = []
    keys: dict[str, str] = {}
    not_object: tuple[int, str] | None = None  # the first item that is not an object (reported at the end)
    with p.open("r", encoding="utf-8-sig", newline="") as f:
        r = _TextReader(f)
        pos = r.skip_ws(0)
        if r.buf[pos : pos + 1] != "[":
            return _parse_whole(p, where)
        pos = r.skip_ws(pos + 1)
        if r.buf[pos : pos + 1] == "]":
            pos += 1
        else:
            i = 0
            while True:
                if pos > _TEXT_PIECE:
                    pos = r.drop(pos)
                while True:
                    try:
                        obj, end = scan(r.buf, pos)
                    except (json.JSONDecodeError, StopIteration) as err:
                        if not r.more(len(r.buf)):  # an item longer than the buffer: read on, doubling
                            if isinstance(err, StopIteration):
                                raise r.error(where, err.value, "Expecting value") from None
                            raise r.error(where, err.pos, err.msg) from None
                        continue
                    if end < len(r.buf) or not r.more():  # a number cut at the buffer's end: decode again
                        break
                if isinstance(obj, dict):
                    if _SURROGATE_ESCAPE.search(r.buf, pos, end):
                        line, _ = r.where(pos)
                        if bad := _surrogate_error(where, f"item {i} (line {line})", obj):
                            raise bad
                    rows.append(_shared_keys(obj, keys))
                elif not_object is None:
                    not_object = (i, _kind(obj))
                i += 1
                pos = r.skip_ws(end)
                c = r.buf[pos : pos + 1]
                if c == "]":
                    pos += 1
                    break
                if c != ",":
                    raise r.error(where, pos, "Expecting ',' delimiter")
                pos = r.skip_ws(pos + 1)
        pos = r.skip_ws(pos)
        if pos < len(r.buf):
            raise r.error(where, pos, "Extra data")
    if not_object is not None:
        raise DataError(
            where, f"item {not_object[0]} of the top-level list is {not_object[1]}, not an object"
        )
    return rows


def _parse_whole(p: Path, where: str) -> list[dict]:
    """A file whose top level is not an array: parse it whole to say what it is instead."""
    text = p.read_text(encoding="utf-8-sig")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(where, f"not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
    if not isinstance(obj, list):
        raise DataError(where, f"top level is {_kind(obj)}, not a list of row objects")
    return obj  # pragma: no cover - an array is parsed item by item


def _try_json(p: Path) -> Any:
    try:
        return json.loads(p.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError):
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


def _write_jsonl(
    path: Path, rows: Iterable[Mapping[str, Any]], fields: tuple[str, ...] | None = FIELDS
) -> int:
    """Write `rows` to `path` as JSON Lines (UTF-8; only `fields`, or every key when None), a row at a time;
    return the number of bytes written. The caller picks `path`: a unique temporary name, moved into place."""
    dumps = json.dumps
    with open(path, "w", encoding="utf-8", errors="replace", newline="") as f:
        if fields is None:
            for r in rows:
                f.write(dumps(r, ensure_ascii=False, default=str) + "\n")
        else:
            for r in rows:
                f.write(dumps({k: r[k] for k in fields}, ensure_ascii=False) + "\n")
    return os.path.getsize(path)
