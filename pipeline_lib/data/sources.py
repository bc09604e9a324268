"""Where the instruction data comes from: source kinds, acquiring into a content-addressed store.

`acquire(source, dest_dir)` fetches a local file, a shipped `builtin:NAME`, an http(s) URL or a Hugging Face
dataset into `dest_dir/<sha256[:16]>/raw.<ext>` (content-addressed, so a repeated acquire copies nothing) and
returns an `Acquired` record. Every problem is a `DataError`: one line naming the source and the problem.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline_lib.netutil import call_with_deadline

DATA_SUFFIXES = (".json", ".jsonl", ".parquet")
BUILTIN_PREFIX = "builtin:"
HF_PREFIX = "hf://"
_HF_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


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
        from pipeline_lib.data.loading import _write_jsonl, load_rows

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
