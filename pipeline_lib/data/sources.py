"""Where the instruction data comes from: source kinds, acquiring into a content-addressed store.

`acquire(source, dest_dir)` fetches a local file, a shipped `builtin:NAME`, an http(s) URL or a Hugging Face
dataset into `dest_dir/<sha256[:16]>/raw.<ext>` (content-addressed, so a repeated acquire copies nothing) and
returns an `Acquired` record. Every problem is a `DataError`: one line naming the source and the problem.
Only those schemes are accepted (`source_kind`); http(s) downloads are bounded in size, time and where they
may be redirected (download.py).

A source URL may carry secrets (a signed URL's signature, a token, user:password@): `redact_url` replaces
them with REDACTED, and everything recorded or shown (`Acquired.source`, errors, the audit) uses it; the real
URL is only handed to the download itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline_lib.config import DataConfig
from pipeline_lib.data.errors import _URL_PARTS, MB, REDACTED, DataError, redact_url  # noqa: F401 (re-exported)
from pipeline_lib.netutil import call_with_deadline

DATA_SUFFIXES = (".json", ".jsonl", ".parquet")
BUILTIN_PREFIX = "builtin:"
HF_PREFIX = "hf://"
_HF_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
SUPPORTED_SOURCES = "a local file path, an http(s):// URL, builtin:NAME or a Hugging Face dataset id"
DEFAULT_MAX_DOWNLOAD_MB: float = DataConfig.model_fields["max_download_mb"].default
DEFAULT_DOWNLOAD_DEADLINE_S: float = DataConfig.model_fields["download_timeout_s"].default


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


SourceKind = Literal["builtin", "url", "hf", "file", "unsupported"]


def source_kind(source: str) -> SourceKind:
    """Which kind of source a `DataConfig.source` string names; "unsupported" for any other `scheme://`
    (ftp://, file://, s3://, ...), which `acquire` refuses (`unsupported_scheme` says why)."""
    if source.startswith(BUILTIN_PREFIX):
        return "builtin"
    m = _SCHEME.match(source)
    if m:
        scheme = m.group(1).lower()
        if scheme in ("http", "https"):
            return "url"
        return "hf" if scheme == "hf" else "unsupported"
    p = Path(source).expanduser()
    if p.exists():
        return "file"
    if _HF_ID.fullmatch(source) and p.suffix.lower() not in (*DATA_SUFFIXES, ".csv", ".txt", ".gz"):
        return "hf"
    return "file"


def unsupported_scheme(source: str) -> str | None:
    """The problem with `source`'s scheme (one line), or None when it is one `acquire` supports."""
    if source_kind(source) != "unsupported":
        return None
    scheme = _SCHEME.match(source).group(1)
    return f"unsupported scheme {scheme + '://'!r} (use {SUPPORTED_SOURCES})"


@dataclass
class CreatedPaths:
    """What one `acquire` (and `prepare`) call created, so that a failed call can take it away again and
    leave whatever was there before it untouched."""

    files: list[Path] = field(default_factory=list)
    dirs: list[Path] = field(default_factory=list)  # removed only when empty
    trees: list[Path] = field(default_factory=list)  # made by this call: removed with all they hold

    def mkdirs(self, path: Path) -> None:
        """`path.mkdir(parents=True, exist_ok=True)`, noting each directory it made."""
        missing = []
        p = Path(path)
        while not p.exists() and p != p.parent:
            missing.append(p)
            p = p.parent
        Path(path).mkdir(parents=True, exist_ok=True)
        self.dirs.extend(reversed(missing))

    def remove(self) -> None:
        """Delete the files and trees, then the directories that are empty, newest first; never raises."""
        for f in reversed(self.files):
            with contextlib.suppress(OSError):
                f.unlink()
        for t in reversed(self.trees):
            shutil.rmtree(t, ignore_errors=True)
        for d in reversed(self.dirs):
            with contextlib.suppress(OSError):
                d.rmdir()


def acquire(
    source: str,
    dest_dir: Path,
    *,
    revision: str | None = None,
    sha256: str | None = None,
    timeout: float = 30,
    max_mb: float | None = None,
    deadline_s: float | None = None,
    created: CreatedPaths | None = None,
) -> Acquired:
    """Fetch `source` into `dest_dir/<sha256[:16]>/raw.<ext>` and return where it is and its content hash.

    `source`: a local JSON/JSONL/Parquet file, `builtin:NAME` (shipped in pipeline_lib/assets), an http(s)
    URL, or a Hugging Face dataset id (`owner/name` or `hf://owner/name`, at `revision`); any other scheme is
    refused. `sha256`, when given, must match the fetched file's hash. Each network wait is bounded by
    `timeout` seconds, a whole http(s) download by `deadline_s` (default `DataConfig.download_timeout_s`), and
    a download or Hub file may not exceed `max_mb` MB (default `DataConfig.max_download_mb`). Failures raise
    `DataError` naming the source with its secrets redacted (`transient=True` where a retry may help).
    `created`, when given, is told every file and directory this call made."""
    dest_dir = Path(dest_dir)
    made = created if created is not None else CreatedPaths()
    shown = redact_url(source)
    expected = sha256.lower() if sha256 else None
    max_bytes = round((max_mb if max_mb is not None else DEFAULT_MAX_DOWNLOAD_MB) * MB)
    deadline = deadline_s if deadline_s is not None else DEFAULT_DOWNLOAD_DEADLINE_S
    kind = source_kind(source)
    if kind == "unsupported":
        raise DataError(shown, unsupported_scheme(source) or "unsupported scheme")
    if kind == "builtin":
        got = _acquire_builtin(source, dest_dir, made)
    elif kind == "url":
        got = _acquire_url(source, dest_dir, expected, timeout, deadline, max_bytes, made)
    elif kind == "hf":
        got = _acquire_hf(source, dest_dir, revision, timeout, max_bytes, made)
    else:
        got = _acquire_file(source, dest_dir, made)
    if expected and got.sha256 != expected:
        raise DataError(shown, f"sha256 mismatch: expected {expected}, got {got.sha256}")
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


def _store(src: Path, digest: str, ext: str, dest_dir: Path, made: CreatedPaths, *, move: bool) -> Path:
    """Put `src` at `dest_dir/<digest[:16]>/raw<ext>` unless it is there already (under a unique temporary
    name first, so concurrent calls never see a half-written file)."""
    target = dest_dir / digest[:16] / f"raw{ext}"
    if target.is_file() and target.stat().st_size == src.stat().st_size:
        if move:
            src.unlink(missing_ok=True)
        return target
    made.mkdirs(target.parent)
    if move:
        os.replace(src, target)
    else:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".copy-")
        os.close(fd)
        try:
            shutil.copyfile(src, tmp)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    made.files.append(target)
    return target


def _stored(dest_dir: Path, sha256: str) -> Path | None:
    for ext in DATA_SUFFIXES:
        p = dest_dir / sha256[:16] / f"raw{ext}"
        if p.is_file():
            return p
    return None


def _acquire_file(source: str, dest_dir: Path, made: CreatedPaths) -> Acquired:
    path = Path(source).expanduser()
    shown = redact_url(source)
    if not path.exists():
        raise DataError(shown, "file not found")
    if not path.is_file():
        raise DataError(shown, "not a file")
    digest = _sha256_file(path)
    target = _store(path, digest, _sniff_ext(path.name, path), dest_dir, made, move=False)
    return Acquired(target, digest, shown)


def _acquire_builtin(source: str, dest_dir: Path, made: CreatedPaths) -> Acquired:
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
        target = _store(path, digest, _sniff_ext(name, path), dest_dir, made, move=False)
    return Acquired(target, digest, source)


def _acquire_url(
    url: str,
    dest_dir: Path,
    expected: str | None,
    timeout: float,
    deadline: float,
    max_bytes: int,
    made: CreatedPaths,
) -> Acquired:
    from pipeline_lib.data.download import download

    shown = redact_url(url)
    if expected and (hit := _stored(dest_dir, expected)) is not None:
        return Acquired(hit, expected, shown)
    made.mkdirs(dest_dir)
    fd, tmp_name = tempfile.mkstemp(dir=dest_dir, prefix=".download-")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            digest = download(url, out, timeout=timeout, deadline=deadline, max_bytes=max_bytes)
        if expected and digest != expected:
            raise DataError(shown, f"sha256 mismatch: expected {expected}, got {digest}")
        name = _URL_PARTS.match(url).group(3).rsplit("/", 1)[-1]
        target = _store(tmp, digest, _sniff_ext(name, tmp), dest_dir, made, move=True)
    finally:
        tmp.unlink(missing_ok=True)
    return Acquired(target, digest, shown)


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


def _acquire_hf(
    source: str, dest_dir: Path, revision: str | None, timeout: float, max_bytes: int, made: CreatedPaths
) -> Acquired:
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
    if not cache.exists():
        made.mkdirs(dest_dir)
        made.trees.append(cache)
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
        size = local[-1].stat().st_size
        if size > max_bytes:  # the Hub client streams to disk; the cap still bounds what is loaded
            cap = f"{round(max_bytes / MB, 3):g} MB download cap (data.max_download_mb)"
            raise DataError(source, f"{name} is {size / MB:.1f} MB, over the {cap}")
    made.mkdirs(dest_dir)
    if len(local) == 1 and not files[0].lower().endswith(".parquet"):
        digest = _sha256_file(local[0])
        target = _store(local[0], digest, _sniff_ext(files[0], local[0]), dest_dir, made, move=False)
    else:  # Parquet shards (or several JSON files): one JSONL file, rows in shard order
        from pipeline_lib.data.loading import _write_jsonl, load_rows

        fd, tmp_name = tempfile.mkstemp(dir=dest_dir, prefix=".convert-")
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            rows: list[dict] = []
            for name, p in zip(files, local, strict=True):
                rows.extend(load_rows(p, name=f"{source}/{name}"))
            _write_jsonl(tmp, rows, fields=None)
            del rows
            digest = _sha256_file(tmp)
            target = _store(tmp, digest, ".jsonl", dest_dir, made, move=True)
        finally:
            tmp.unlink(missing_ok=True)
    if commit:
        index_path = dest_dir / "hf_index.json"
        index = _hf_index(dest_dir)
        index[f"{repo_id}@{commit}"] = str(target.relative_to(dest_dir))
        if not index_path.exists():
            made.files.append(index_path)
        fd, tmp_name = tempfile.mkstemp(dir=dest_dir, prefix=".hf_index-")
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(index, indent=1, sort_keys=True))
        os.replace(tmp_name, index_path)
    return Acquired(target, digest, source, commit)
