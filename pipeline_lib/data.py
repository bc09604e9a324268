"""Instruction data: acquire, load, validate, clean with named rules (audited), split, prepare.

Stages, each a plain function:

- `acquire(source, dest_dir)` fetches a local file, a shipped `builtin:NAME`, an http(s) URL or a Hugging Face
  dataset into `dest_dir/<sha256[:16]>/raw.<ext>` (content-addressed, so a repeated acquire copies nothing);
- `load_rows(path)` reads a JSON array or JSON Lines file (or Parquet); whole-file problems raise `DataError`;
- `clean(rows, cfg)` validates each row and applies the cleaning rules in `RULES` (repairs first, then drops,
  duplicates last), counting every repaired or dropped row in an `Audit`;
- `split(rows, eval_fraction, seed)` holds out an evaluation split;
- `prepare(source, out_dir, cfg)` does all of it and writes clean.jsonl, train.jsonl, eval.jsonl and
  audit.json, returning a `PreparedData` (paths and fingerprints, JSON-able).

The rules cover the known defects of the original Alpaca set (docs: data notes): hallucination bait, merged
instructions, empty outputs, empty code answers, `<nooutput>` answers, `N/A` answers, placeholder inputs,
unclear instructions and stray control/escape characters, plus exact and normalised duplicates. They are
deliberately narrow: a clean row, in any language, is never changed or dropped.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline_lib.config import CleaningConfig, DataConfig
from pipeline_lib.netutil import call_with_deadline

Row = dict[str, str]
FIELDS = ("instruction", "input", "output")
DATA_SUFFIXES = (".json", ".jsonl", ".parquet")
BUILTIN_PREFIX = "builtin:"
HF_PREFIX = "hf://"
_HF_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
_EXAMPLES = 3  # examples kept per rule in the audit
_SHOW = 80  # characters of an example shown in the audit


class DataError(Exception):
    """Data that cannot be used; `str()` is one line naming the file or source and the problem.

    `transient` is True where the outside world failed (network, timeouts), so a retry may help."""

    def __init__(self, where: str, problem: str, transient: bool = False) -> None:
        super().__init__(where, problem, transient)
        self.where = str(where)
        self.problem = str(problem)
        self.transient = transient

    def __str__(self) -> str:
        return " ".join(f"{self.where}: {self.problem}".split("\n"))


# --------------------------------------------------------------------------------------------------- acquire


@dataclass(frozen=True)
class Acquired:
    """A data file fetched into the local store; `sha256` (of the file's bytes) fingerprints the data set."""

    path: Path
    sha256: str
    source: str
    revision: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "sha256": self.sha256,
            "source": self.source,
            "revision": self.revision,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Acquired:
        return cls(Path(d["path"]), d["sha256"], d["source"], d.get("revision"))


SourceKind = Literal["builtin", "url", "hf", "file"]


def source_kind(source: str) -> SourceKind:
    """Which kind of source a `DataConfig.source` string names."""
    if source.startswith(BUILTIN_PREFIX):
        return "builtin"
    if re.match(r"(?i)https?://", source):
        return "url"
    if source.startswith(HF_PREFIX):
        return "hf"
    p = Path(source).expanduser()
    if p.exists():
        return "file"
    if _HF_ID.fullmatch(source) and p.suffix.lower() not in (*DATA_SUFFIXES, ".csv", ".txt", ".gz"):
        return "hf"
    return "file"


def acquire(
    source: str,
    dest_dir: Path,
    *,
    revision: str | None = None,
    sha256: str | None = None,
    timeout: float = 30,
) -> Acquired:
    """Fetch `source` into `dest_dir/<sha256[:16]>/raw.<ext>` and return where it is and its content hash.

    `source`: a local JSON/JSONL/Parquet file, `builtin:NAME` (shipped in pipeline_lib/assets), an http(s)
    URL, or a Hugging Face dataset id (`owner/name` or `hf://owner/name`, at `revision`). `sha256`, when given,
    must match the fetched file's hash. Network waits are bounded by `timeout` seconds; failures raise
    `DataError` (with `transient=True` where a retry may help)."""
    dest_dir = Path(dest_dir)
    expected = sha256.lower() if sha256 else None
    kind = source_kind(source)
    if kind == "builtin":
        got = _acquire_builtin(source, dest_dir)
    elif kind == "url":
        got = _acquire_url(source, dest_dir, expected, timeout)
    elif kind == "hf":
        got = _acquire_hf(source, dest_dir, revision, timeout)
    else:
        got = _acquire_file(source, dest_dir)
    if expected and got.sha256 != expected:
        raise DataError(source, f"sha256 mismatch: expected {expected}, got {got.sha256}")
    return got


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sniff_ext(name: str, path: Path) -> str:
    suffix = Path(name).suffix.lower()
    if suffix in DATA_SUFFIXES:
        return suffix
    with path.open("rb") as f:
        head = f.read(4096)
    if head[:4] == b"PAR1":
        return ".parquet"
    first = head.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    return ".jsonl" if first == b"{" else ".json"


def _store(src: Path, digest: str, ext: str, dest_dir: Path, *, move: bool) -> Path:
    """Put `src` at `dest_dir/<digest[:16]>/raw<ext>` unless it is there already."""
    target = dest_dir / digest[:16] / f"raw{ext}"
    if target.is_file() and target.stat().st_size == src.stat().st_size:
        if move:
            src.unlink(missing_ok=True)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if move:
        os.replace(src, target)
    else:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".copy-")
        os.close(fd)
        shutil.copyfile(src, tmp)
        os.replace(tmp, target)
    return target


def _stored(dest_dir: Path, sha256: str) -> Path | None:
    for ext in DATA_SUFFIXES:
        p = dest_dir / sha256[:16] / f"raw{ext}"
        if p.is_file():
            return p
    return None


def _acquire_file(source: str, dest_dir: Path) -> Acquired:
    path = Path(source.removeprefix("file://")).expanduser()
    if not path.exists():
        raise DataError(source, "file not found")
    if not path.is_file():
        raise DataError(source, "not a file")
    digest = _sha256_file(path)
    target = _store(path, digest, _sniff_ext(path.name, path), dest_dir, move=False)
    return Acquired(target, digest, source)


def _acquire_builtin(source: str, dest_dir: Path) -> Acquired:
    from importlib import resources

    name = source.removeprefix(BUILTIN_PREFIX)
    assets = resources.files("pipeline_lib.assets")
    available = sorted(
        p.name for p in assets.iterdir() if p.name.lower().endswith(DATA_SUFFIXES) and p.is_file()
    )
    if not name or "/" in name or "\\" in name or name.startswith(".") or not assets.joinpath(name).is_file():
        raise DataError(source, f"no such built-in data set (available: {', '.join(available) or 'none'})")
    with resources.as_file(assets.joinpath(name)) as path:
        digest = _sha256_file(path)
        target = _store(path, digest, _sniff_ext(name, path), dest_dir, move=False)
    return Acquired(target, digest, source)


def _acquire_url(url: str, dest_dir: Path, expected: str | None, timeout: float) -> Acquired:
    import urllib.error
    import urllib.parse
    import urllib.request

    if expected and (hit := _stored(dest_dir, expected)) is not None:
        return Acquired(hit, expected, url)
    req = urllib.request.Request(url, headers={"User-Agent": "qabot"})
    try:
        resp = call_with_deadline(lambda: urllib.request.urlopen(req, timeout=timeout), timeout + 5)
    except urllib.error.HTTPError as err:
        raise DataError(
            url, f"HTTP {err.code} {err.reason}", transient=err.code >= 500 or err.code == 429
        ) from None
    except urllib.error.URLError as err:
        raise DataError(url, f"could not reach URL: {err.reason}", transient=True) from None
    except (OSError, TimeoutError, ValueError) as err:
        raise DataError(
            url, f"could not reach URL: {err}", transient=not isinstance(err, ValueError)
        ) from None
    dest_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest_dir, prefix=".download-")
    tmp = Path(tmp_name)
    h = hashlib.sha256()
    try:
        with resp, os.fdopen(fd, "wb") as out:
            for chunk in iter(lambda: resp.read(1 << 20), b""):
                h.update(chunk)
                out.write(chunk)
    except (OSError, TimeoutError) as err:
        tmp.unlink(missing_ok=True)
        raise DataError(url, f"download interrupted: {err}", transient=True) from None
    digest = h.hexdigest()
    if expected and digest != expected:
        tmp.unlink(missing_ok=True)
        raise DataError(url, f"sha256 mismatch: expected {expected}, got {digest}")
    name = urllib.parse.urlparse(url).path.rsplit("/", 1)[-1]
    target = _store(tmp, digest, _sniff_ext(name, tmp), dest_dir, move=True)
    return Acquired(target, digest, url)


_HF_SKIP = re.compile(r"(?:^|/)(?:\.|dataset_infos?\.json$|dataset_dict\.json$|state\.json$)")
_HF_TRAIN = re.compile(r"(?:^|[/_.-])train(?:[/_.-]|$)")
_HF_NOT_TRAIN = re.compile(r"(?:^|[/_.-])(?:test|valid|validation|eval|dev)(?:[/_.-]|$)")


def pick_data_files(names: Iterable[str]) -> list[str]:
    """The data file(s) of a dataset repository: Parquet, else JSONL, else JSON; the train split if named."""
    cands = [n for n in names if n.lower().endswith(DATA_SUFFIXES) and not _HF_SKIP.search(n)]
    for ext in (".parquet", ".jsonl", ".json"):
        group = sorted(n for n in cands if n.lower().endswith(ext))
        if not group:
            continue
        train = [n for n in group if _HF_TRAIN.search(n.lower())]
        if train:
            return train
        return [n for n in group if not _HF_NOT_TRAIN.search(n.lower())] or group
    return []


def _hf_error(repo_id: str, revision: str | None, err: BaseException) -> DataError:
    from huggingface_hub import errors as hf_errors

    at = f" at revision {revision!r}" if revision else ""
    if isinstance(err, hf_errors.RevisionNotFoundError):
        return DataError(repo_id, f"revision {revision!r} not found on the Hugging Face Hub")
    if isinstance(err, hf_errors.RepositoryNotFoundError | hf_errors.GatedRepoError):
        return DataError(
            repo_id,
            f"dataset not found on the Hugging Face Hub{at}, or it is private or gated (log in with `hf auth login`)",
        )
    if isinstance(err, hf_errors.OfflineModeIsEnabled):
        return DataError(repo_id, "Hugging Face Hub unreachable: offline mode is on (HF_HUB_OFFLINE)")
    if isinstance(err, hf_errors.HfHubHTTPError):
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        return DataError(repo_id, f"Hugging Face Hub error{at}: {reason}", transient=True)
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    hint = "" if repo_id.startswith(HF_PREFIX) else " (and no local file of that name exists)"
    return DataError(
        repo_id,
        f"Hugging Face Hub unreachable while fetching dataset {repo_id.removeprefix(HF_PREFIX)!r}{at}: "
        f"{reason}{hint}; use a local file, a URL or builtin:smoke_alpaca.jsonl",
        transient=True,
    )


def _hf_index(dest_dir: Path) -> dict[str, str]:
    try:
        return json.loads((dest_dir / "hf_index.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _acquire_hf(source: str, dest_dir: Path, revision: str | None, timeout: float) -> Acquired:
    repo_id = source.removeprefix(HF_PREFIX).strip("/")
    if not _HF_ID.fullmatch(repo_id):
        raise DataError(source, "not a Hugging Face dataset id (expected 'owner/name')")
    if revision and re.fullmatch(r"[0-9a-f]{40}", revision):  # a pinned commit never changes: reuse it
        hit = _hf_index(dest_dir).get(f"{repo_id}@{revision}")
        if hit and (dest_dir / hit).is_file():
            path = dest_dir / hit
            return Acquired(path, _sha256_file(path), source, revision)

    from huggingface_hub import HfApi, hf_hub_download

    try:
        info = call_with_deadline(
            lambda: HfApi().dataset_info(repo_id, revision=revision, timeout=timeout), timeout + 5
        )
    except Exception as err:  # noqa: BLE001 - every failure becomes one clear line
        raise _hf_error(source, revision, err) from None
    commit = info.sha or revision
    files = pick_data_files(s.rfilename for s in (info.siblings or []))
    if not files:
        raise DataError(source, "no JSON, JSONL or Parquet data file in the dataset repository")
    cache = dest_dir / "hf-cache"
    local: list[Path] = []
    for name in files:
        try:
            local.append(
                Path(
                    hf_hub_download(
                        repo_id,
                        name,
                        repo_type="dataset",
                        revision=commit,
                        cache_dir=cache,
                        etag_timeout=timeout,
                    )
                )
            )
        except Exception as err:  # noqa: BLE001
            raise _hf_error(source, revision, err) from None
    dest_dir.mkdir(parents=True, exist_ok=True)
    if len(local) == 1 and not files[0].lower().endswith(".parquet"):
        digest = _sha256_file(local[0])
        target = _store(local[0], digest, _sniff_ext(files[0], local[0]), dest_dir, move=False)
    else:  # Parquet shards (or several JSON files): one JSONL file, rows in shard order
        fd, tmp_name = tempfile.mkstemp(dir=dest_dir, prefix=".convert-")
        os.close(fd)
        tmp = Path(tmp_name)
        rows: list[dict] = []
        for name, p in zip(files, local, strict=True):
            rows.extend(load_rows(p, name=f"{source}/{name}"))
        _write_jsonl(tmp, rows, fields=None)
        digest = _sha256_file(tmp)
        target = _store(tmp, digest, ".jsonl", dest_dir, move=True)
    if commit:
        index = _hf_index(dest_dir)
        index[f"{repo_id}@{commit}"] = str(target.relative_to(dest_dir))
        (dest_dir / "hf_index.json").write_text(json.dumps(index, indent=1, sort_keys=True))
    return Acquired(target, digest, source, commit)


# ------------------------------------------------------------------------------------------------------ load


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


# ----------------------------------------------------------------------------------------------------- rules
#
# Each rule is one small function. Repairs take a row and return a repaired copy, or None when nothing
# changed. Drops take a row and return True when it is to be dropped. All patterns are compiled once.

_CTRL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufeff\ud800-\udfff]")
_NEEDS_TEXT_REPAIR = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ufeff\ud800-\udfff\\]")
_CODE_LIKE = re.compile(r"[{};=<>]|\w\(|^\s*(?:def|class|import|return|print)\b|\n(?: {2,}|\t)\S", re.M)
# literal "\n" typed where a line break was meant: after sentence punctuation, before a new sentence/item
_ESC_INNER = re.compile(r"(?<=[.!?)\]\"'])(?:\\r)?\\n(?=(?:\\r)?\\n|[A-Z0-9\"'(*\u2022-])")
_ESC_START = re.compile(r"\A(?:\\[nrt])+(?=[A-Z0-9\"'(*\u2022-])")
_ESC_END = re.compile(r"(?<=[.!?)\]\"'])(?:\\[nrt])+\Z")
_ESC_QUOTE = re.compile(r"\\([\"'])")
_LEADING_BLANK_LINES = re.compile(r"\A(?:[ \t]*\n)+")


def _repair_text(s: str, keep_indent: bool) -> str:
    if not (s[:1].isspace() or s[-1:].isspace() or _NEEDS_TEXT_REPAIR.search(s)):
        return s
    if "\r" in s:
        s = s.replace("\r\n", "\n").replace("\r", "\n")
    s = _CTRL.sub("", s)
    if "\\" in s and not _CODE_LIKE.search(s):
        s = _ESC_START.sub("", s)
        s = _ESC_END.sub("", s)
        s = _ESC_INNER.sub("\n", s)
        s = _ESC_QUOTE.sub(r"\1", s)
    if keep_indent:  # an output may be code whose first line is indented: trim blank lines, not indentation
        s = _LEADING_BLANK_LINES.sub("", s.rstrip())
        return s if "\n" in s else s.lstrip()
    return s.strip()


def repair_control_chars(row: Row) -> Row | None:
    """Remove control characters (keeping newlines and tabs), stray literal escapes in prose ("\\n" after a
    sentence, \\" quotes) and surrounding whitespace; Windows line ends become \\n."""
    new = {
        "instruction": _repair_text(row["instruction"], False),
        "input": _repair_text(row["input"], False),
        "output": _repair_text(row["output"], True),
    }
    return None if new == row else new


_MERGED = re.compile(
    r"(?:\A|\s*\n)[ \t]*#{2,}[ \t]*(?:\n\s*(?:\d+\s*\.\s*)?(?:instruction|input|output)\s*:|\s*\Z)", re.I
)
_MERGED_NUMBERED = re.compile(
    r"\s*\n\s*(\d+)\s*\.\s*instruction\s*:.*?\n\s*\1\s*\.\s*output\s*:", re.I | re.S
)


def _cut_merged(s: str) -> str:
    if "#" not in s and "nstruction" not in s and "NSTRUCTION" not in s:
        return s
    m = _MERGED.search(s) or _MERGED_NUMBERED.search(s)
    return s[: m.start()].rstrip() if m else s


def repair_merged_instruction(row: Row) -> Row | None:
    """Cut a field that runs on into a following generated task ("\\n##\\n18. Instruction: ...")."""
    new = {k: _cut_merged(row[k]) for k in FIELDS}
    return None if new == row else new


_EMPTY_INPUT = re.compile(
    r"[<\[(]\s*(?:no[\s_-]*input|none|null|nil|empty|blank|n\s*/\s*a)\s*[>\])]\.?"
    r"|no[\s_-]*input(?:\s+(?:is\s+)?(?:required|needed|necessary|provided|given))?\.?"
    r"|n\s*/\s*a\.?",
    re.I,
)


def repair_empty_input(row: Row) -> Row | None:
    """Turn placeholder inputs ('<noinput>', '<no input>', 'No input', 'N/A', '<none>', ...) into ''."""
    inp = row["input"]
    if inp and len(inp) < 40 and _EMPTY_INPUT.fullmatch(inp.strip()):
        return {**row, "input": ""}
    return None


def drop_empty_output(row: Row) -> bool:
    """The output is empty or only whitespace."""
    return not row["output"].strip()


_NOOUTPUT = re.compile(r"[<\[(]\s*no[\s_-]*(?:output|input|answer|response)\s*[>\])]\.?", re.I)
_CANNOT_GPT = re.compile(
    r"(?:this|the)\s+(?:type\s+of\s+)?(?:instruction|task|request|question)\s+(?:cannot|can\s*not|can't)\s+be\s+"
    r"(?:fulfilled|completed|performed|carried\s+out|done|answered|accomplished)\s+(?:by|with)\s+(?:a|an|the)\s+"
    r"(?:gpt|language|ai)\b",
    re.I,
)
_CANNOT_MEDIA = re.compile(
    r"as\s+an\s+ai\b[^.\n]{0,60}?\b(?:cannot|can\s*not|can't|am\s+not\s+able\s+to|am\s+unable\s+to|"
    r"do\s+not\s+have\s+the\s+ability\s+to|don't\s+have\s+the\s+ability\s+to)\s+(?:\w+\s+){0,2}?"
    r"(?:generate|create|draw|produce|make|display|show|design|paint|render|compose)\s+(?:[\w-]+\s+){0,3}?"
    r"(?:images?|pictures?|photos?|photographs?|drawings?|paintings?|graphics?|logos?|visuals?|videos?|audio|"
    r"music|sounds?|songs?|diagrams?|charts?|sketch(?:es)?|illustrations?)\b",
    re.I,
)


def drop_nooutput(row: Row) -> bool:
    """The output is a '<nooutput>' / '<No Output>' placeholder, or a stock refusal to make images/media
    ('This instruction cannot be fulfilled by a GPT model', 'As an AI I cannot create images')."""
    out = row["output"].strip()
    if len(out) < 30:
        return bool(_NOOUTPUT.fullmatch(out))
    head = out[:200]
    return bool(_CANNOT_GPT.match(head) or _CANNOT_MEDIA.match(head))


_NA = re.compile(r"[<\[(]?\s*n\s*/\s*a\s*[>\])]?\.?", re.I)
_NA_TOPIC = re.compile(r"\bn\s*/\s*a\b|abbreviat|acronym|not\s+applicable|not\s+available", re.I)


def drop_na_output(row: Row) -> bool:
    """The output is just 'N/A' (unless the instruction asks about that abbreviation)."""
    out = row["output"].strip()
    return len(out) < 12 and bool(_NA.fullmatch(out)) and not _NA_TOPIC.search(row["instruction"])


_LETTER = re.compile(r"[^\W\d_]")
_PLACEHOLDER_ONLY = re.compile(
    r"[<\[(][^<>\[\]()\n]{0,40}[>\])]\.?|n\s*/\s*a\.?|(?:https?://|www\.)\S+", re.I
)


def drop_unclear_instruction(row: Row) -> bool:
    """The instruction has fewer than two letters (in any script), or is only a placeholder or a URL."""
    ins = row["instruction"].strip()
    m = _LETTER.search(ins)
    if m is None or _LETTER.search(ins, m.end()) is None:
        return True
    return len(ins) < 120 and bool(_PLACEHOLDER_ONLY.fullmatch(ins))


_REF_NOUN = (
    r"(?:sentences?|texts?|paragraphs?|passages?|articles?|statements?|phrases?|words?|lists?|data|dataset|"
    r"code|snippets?|poems?|story|stories|emails?|letters?|questions?|equations?|expressions?|tables?|"
    r"documents?|inputs?|essays?|tweets?|reviews?|excerpts?|quotes?|songs?|lyrics|recipes?|programs?|"
    r"functions?|numbers?|items?|strings?|conversations?|dialogues?|headlines?|titles?|descriptions?|"
    r"summar(?:y|ies)|reports?|messages?|speech|images?|pictures?|photos?|graphs?|charts?)"
)
_MISSING_INPUT = re.compile(
    r"\bthe\s+(?:following|given|provided|attached)"
    r"(?!\s+(?:names?|days?|weeks?|months?|years?|mornings?|nights?|evenings?|seasons?|times?|weekends?|"
    r"decades?|centur(?:y|ies))\b)(?:\s+[\w'-]+){0,3}\s*[.:?!]?\s*\Z"
    r"|\b(?:this|these)\s+(?:[\w'-]+\s+){0,2}?"
    + _REF_NOUN
    + r"(?:\s+(?:below|above))?(?:\s+(?:into|in|to|as|from|using|for|with)(?:\s+[\w'-]+){1,2})?\s*[.:?!]?\s*\Z",
    re.I,
)


def drop_missing_input(row: Row) -> bool:
    """The instruction ends by pointing at content ('... the following sentence.', '... this text.') but the
    input is empty, so the output can only be made up."""
    if row["input"].strip():
        return False
    return bool(_MISSING_INPUT.search(row["instruction"].strip()[-120:]))


_MEDIA = (
    r"(?:pictures?|images?|photos?|photographs?|pics?|graphs?|charts?|diagrams?|videos?|audio|recordings?|"
    r"links?|urls?|attachments?|files?|screenshots?|drawings?|paintings?|maps?|documents?|pdfs?|articles?|"
    r"websites?|web\s*pages?|gifs?)"
)
_MEDIA_LEAD = r"(?:insert|attached|attach|upload(?:ed)?|an?|the|see|link\s+to|url\s+(?:of|to)|paste)"
_MEDIA_TAIL = r"(?:attached|here|provided|below|link|url)"
_PLACEHOLDER_INPUT = re.compile(
    r"[<\[(]\s*(?:"
    + _MEDIA_LEAD
    + r"\s+)*"
    + _MEDIA
    + r"(?:\s+(?:"
    + _MEDIA_TAIL
    + r"|of\b[^<>\[\]()\n]{0,60}))?"
    r"\s*[>\])]\.?",
    re.I,
)
_PLACEHOLDER_IN_TEXT = re.compile(
    r"<\s*(?:"
    + _MEDIA_LEAD
    + r"\s+)+"
    + _MEDIA
    + r"[^<>\n]{0,40}>|<\s*"
    + _MEDIA
    + r"\s+"
    + _MEDIA_TAIL
    + r"\s*>",
    re.I,
)
_URL_ONLY = re.compile(r"(?:https?://|www\.)\S+", re.I)
_URL_TOPIC = re.compile(
    r"\b(?:urls?|links?|hyperlinks?|domains?|subdomains?|web\s*address(?:es)?|website\s+address(?:es)?|"
    r"protocols?|https?|query\s+strings?|uris?|paths?)\b",
    re.I,
)


def drop_hallucination_bait(row: Row) -> bool:
    """The input is only a URL (and the task is not about the URL itself) or a media placeholder such as
    '<Picture Attached>' / '[Image]', or the instruction carries such a placeholder: the output can only be
    invented."""
    inp = row["input"].strip()
    if inp and len(inp) < 300:
        if _PLACEHOLDER_INPUT.fullmatch(inp):
            return True
        if _URL_ONLY.fullmatch(inp) and not _URL_TOPIC.search(row["instruction"]):
            return True
    return bool(
        ("<" in row["instruction"] and _PLACEHOLDER_IN_TEXT.search(row["instruction"]))
        or ("<" in inp and _PLACEHOLDER_IN_TEXT.search(inp))
    )


_LANG = (
    r"(?<![\w+#])(?:python|javascript|java|typescript|c\+\+|c#|c|ruby|php|sql|html|css|bash|shell|powershell|"
    r"perl|rust|golang|go|swift|kotlin|scala|matlab|r|haskell|lua|julia|dart|vba|assembly)(?![\w+#])"
)
_CODE_NOUN = (
    r"(?:code|programs?|scripts?|functions?|methods?|class(?:es)?|quer(?:y|ies)|snippets?|statements?|loops?|"
    r"modules?|routines?|subroutines?|algorithms?|commands?|pages?|documents?|templates?|regex(?:es)?)\b"
)
_CODE_VERB = (
    r"\b(?:write|create|generate|implement|develop|compose|construct|build|code|program|fix|refactor|"
    r"complete|rewrite|modify|edit|convert|translate|optimi[sz]e|design|make)\b"
)
_CODE_REQUEST = re.compile(
    _CODE_VERB
    + r"[^.?!\n]{0,60}?(?:"
    + _LANG
    + r"\s+"
    + _CODE_NOUN
    + r"|\b"
    + _CODE_NOUN
    + r"\s+(?:in|using)\s+"
    + _LANG
    + r"|\b(?:pieces?|snippets?|blocks?|lines?)\s+of\s+code\b|\bcode\s+(?:snippets?|blocks?)\b|\bsource\s+code\b"
    + r"|\b(?:regex(?:es)?|regular\s+expressions?|subroutines?|sql\s+quer(?:y|ies))\b)"
    + r"|\b(?:write|implement)\s+(?:a\s+|an\s+|some\s+|the\s+)?(?:[\w-]+\s+)?(?:code|function)\b"
    r"(?!\s+(?:of|word|name|phrase)\b)",
    re.I,
)
# every _CODE_REQUEST match contains one of these: a cheap test first
_CODE_WORDS = (
    "code", "program", "script", "function", "method", "class", "quer", "snippet", "statement", "loop",
    "module", "routine", "algorithm", "command", "page", "document", "template", "regex", "regular",
)  # fmt: skip
_HAS_CODE = re.compile(
    r"[{}\[\];=<>`\\|$]|\w\(|^\s*(?:def|class|import|from|for|while|if|return|print|echo|puts|let|var|const|"
    r"function|public|private|static|SELECT|INSERT|UPDATE|DELETE|CREATE|ALTER|DROP|WITH)\b|^\s*#(?:include|!)"
    r"|\n(?: {2,}|\t)\S|(?i:\bselect\b[^\n]*\bfrom\b)",
    re.M,
)


def drop_empty_code(row: Row) -> bool:
    """The instruction asks for code (a Python function, an SQL query, a piece of code...) and the output
    contains nothing that looks like code."""
    ins = row["instruction"]
    low = ins.lower()
    if not any(w in low for w in _CODE_WORDS):
        return False
    return bool(_CODE_REQUEST.search(ins)) and not _HAS_CODE.search(row["output"])


@dataclass(frozen=True)
class Rule:
    """One named cleaning rule: a repair (row -> repaired row or None) or a drop (row -> bool)."""

    name: str
    action: Literal["repair", "drop"]
    flag: str  # the CleaningConfig switch
    fn: Callable[[Row], Any]
    description: str


RULES: tuple[Rule, ...] = (
    Rule("control_chars", "repair", "strip_control_chars", repair_control_chars,
         "remove control characters and stray escapes, trim whitespace"),
    Rule("merged_instruction", "repair", "cut_merged_instructions", repair_merged_instruction,
         "cut a field at a '##' marker followed by another numbered task"),
    Rule("empty_input", "repair", "normalize_empty_input", repair_empty_input,
         "placeholder input ('<noinput>', 'No input', 'N/A') becomes ''"),
    Rule("empty_output", "drop", "drop_empty_output", drop_empty_output, "output is empty"),
    Rule("nooutput", "drop", "drop_nooutput", drop_nooutput,
         "output is '<nooutput>' or a stock refusal to make images"),
    Rule("na_output", "drop", "drop_na_output", drop_na_output, "output is 'N/A'"),
    Rule("unclear_instruction", "drop", "drop_unclear_instruction", drop_unclear_instruction,
         "instruction has no words, or is only a placeholder or URL"),
    Rule("missing_input", "drop", "drop_missing_input", drop_missing_input,
         "instruction points at an input that is empty"),
    Rule("hallucination_bait", "drop", "drop_hallucination_bait", drop_hallucination_bait,
         "input is only a URL or a media placeholder"),
    Rule("empty_code", "drop", "drop_empty_code", drop_empty_code,
         "code was asked for, the output has none"),
)  # fmt: skip
INVALID_ROW = "invalid_row"
DUPLICATE = "duplicate"
NEAR_DUPLICATE = "near_duplicate"
SAMPLED_OUT = "max_rows"
_RULE_DESCRIPTIONS = {
    INVALID_ROW: "instruction/output missing or not text",
    DUPLICATE: "same instruction, input and output as an earlier row",
    NEAR_DUPLICATE: "same as an earlier row up to case, whitespace and punctuation",
    SAMPLED_OUT: "left out by the seeded max_rows sample",
    **{r.name: r.description for r in RULES},
}


def rule_names() -> list[str]:
    """Every rule name an audit can contain, in the order the rules run."""
    return [INVALID_ROW, *(r.name for r in RULES), DUPLICATE, NEAR_DUPLICATE, SAMPLED_OUT]


# ----------------------------------------------------------------------------------------------------- audit


def _show(s: str | None) -> str | None:
    if s is None:
        return None
    text = json.dumps(s, ensure_ascii=False)[1:-1]  # newlines and control characters stay visible
    return text if len(text) <= _SHOW else text[: _SHOW - 1] + "…"


@dataclass
class RuleStats:
    rule: str
    action: str  # "repair" or "drop"
    enabled: bool = True
    count: int = 0
    examples: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Audit:
    """What cleaning did: per rule, how many rows it repaired or dropped, with a few examples.

    `rows_in == rows_out + dropped` always holds."""

    rows_in: int = 0
    rows_out: int = 0
    rules: dict[str, RuleStats] = field(default_factory=dict)

    @property
    def dropped(self) -> int:
        return sum(s.count for s in self.rules.values() if s.action == "drop")

    @property
    def repaired(self) -> int:
        return sum(s.count for s in self.rules.values() if s.action == "repair")

    def add_rule(self, name: str, action: str, enabled: bool = True) -> None:
        self.rules.setdefault(name, RuleStats(name, action, enabled))

    def record(self, rule: str, row: int, field_: str, before: str | None, after: str | None = None,
               **extra: Any) -> None:  # fmt: skip
        s = self.rules[rule]
        s.count += 1
        if len(s.examples) < _EXAMPLES:
            s.examples.append(
                {"row": row, "field": field_, "before": _show(before), "after": _show(after), **extra}
            )

    def count(self, rule: str) -> int:
        s = self.rules.get(rule)
        return s.count if s else 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows_in": self.rows_in,
            "rows_out": self.rows_out,
            "dropped": self.dropped,
            "repaired": self.repaired,
            "rules": {k: asdict(v) for k, v in self.rules.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Audit:
        return cls(d["rows_in"], d["rows_out"], {k: RuleStats(**v) for k, v in d.get("rules", {}).items()})


def _example_line(ex: Mapping[str, Any]) -> str:
    s = f"row {ex['row']} {ex.get('field', '')}: {ex.get('before')!r}"
    if ex.get("after") is not None:
        s += f" -> {ex['after']!r}"
    if ex.get("reason"):
        s += f" ({ex['reason']})"
    if ex.get("of") is not None:
        s += f" (same as row {ex['of']})"
    return s


def audit_table(audit: Audit | Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per rule (rule, action, count, example, description) for logging as a table."""
    d = audit.to_dict() if isinstance(audit, Audit) else audit
    out = []
    for name, s in d["rules"].items():
        action = s["action"] if s.get("enabled", True) else f"{s['action']} (off)"
        ex = s["examples"][0] if s.get("examples") else None
        out.append({
            "rule": name,
            "action": action,
            "count": s["count"],
            "example": _example_line(ex) if ex else "",
            "description": _RULE_DESCRIPTIONS.get(name, ""),
        })  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------------- clean

_NORM = re.compile(r"[\s.,;:!?'\"`()\[\]{}\u201c\u201d\u2018\u2019\u00ab\u00bb\u2026\u3002\uff0c]+")


def _norm(s: str) -> str:
    return _NORM.sub(" ", s.casefold()).strip()


def _changed_field(before: Row, after: Row) -> str:
    return next((k for k in FIELDS if before[k] != after[k]), "output")


_DROP_FIELD = {
    "empty_output": "output",
    "nooutput": "output",
    "na_output": "output",
    "unclear_instruction": "instruction",
    "missing_input": "instruction",
    "hallucination_bait": "input",
    "empty_code": "output",
}


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
                f = _changed_field(row, new)
                audit.record(rule.name, n, f, row[f], new[f])
                row = new
        for rule in drops:
            if rule.fn(row):
                f = _DROP_FIELD[rule.name]
                audit.record(rule.name, n, f, row[f])
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


def clean_acquired(
    acquired: Acquired | Mapping[str, Any], out_dir: str | os.PathLike, cfg: DataConfig
) -> PreparedData:
    """Load, clean, sample, split and write an acquired file into `out_dir` (see `prepare`)."""
    acq = acquired if isinstance(acquired, Acquired) else Acquired.from_dict(acquired)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    raw = load_rows(acq.path, name=acq.source)
    rows, audit = clean(raw, cfg.cleaning)
    del raw
    if cfg.max_rows is not None:
        rows = sample_rows(rows, cfg.max_rows, cfg.seed, audit)
    if len(rows) < 2:
        raise DataError(
            acq.source, f"only {len(rows)} usable row(s) left after cleaning {audit.rows_in}; need at least 2"
        )
    train, ev = split(rows, cfg.eval_fraction, cfg.seed)
    paths = {k: out / f"{k}.jsonl" for k in ("clean", "train", "eval")}
    h = hashlib.sha256()
    for key, part in (("clean", rows), ("train", train), ("eval", ev)):
        data = _write_jsonl(paths[key], part)
        h.update(f"{key}:{len(data)}:".encode())
        h.update(data)
    fp = h.hexdigest()[:16]
    report = {
        **audit.to_dict(),
        "source": acq.source,
        "source_sha256": acq.sha256,
        "revision": acq.revision,
        "fingerprint": fp,
        "n_train": len(train),
        "n_eval": len(ev),
        "settings": cfg.model_dump(mode="json", exclude={"source"}),
    }
    audit_path = out / "audit.json"
    _write_bytes(audit_path, (json.dumps(report, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    return PreparedData(
        clean_path=str(paths["clean"]),
        train_path=str(paths["train"]),
        eval_path=str(paths["eval"]),
        audit_path=str(audit_path),
        fingerprint=fp,
        source=acq.source,
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

    Raises `DataError` (one line naming the source and the problem) when the data cannot be used."""
    out = Path(out_dir)
    acquired = acquire(
        source,
        Path(cache_dir) if cache_dir is not None else out / "raw",
        revision=cfg.revision,
        sha256=cfg.sha256,
    )
    return clean_acquired(acquired, out, cfg)
