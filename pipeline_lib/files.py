"""Fingerprints and small JSON files: how stages name what they read and write.

- `fingerprint(obj)`: short stable hash of JSON-able data (a config slice, a list of fingerprints);
- `file_sha256(path)` / `directory_fingerprint(path)`: content hashes of a file / a directory tree;
- `write_json(path, data)`: atomic (temporary file + rename, so a kill never leaves half a file);
- `read_json(path, default)`: the data, or `default` when the file is missing or unreadable.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def fingerprint(obj: Any) -> str:
    """Stable short hash of JSON-able data (pydantic models are dumped first)."""
    dump = getattr(obj, "model_dump", None)
    if callable(dump):
        obj = dump(mode="json")
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_sha256(path: str | os.PathLike) -> str:
    """Full sha256 (hex) of a file's content."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def directory_fingerprint(path: str | os.PathLike) -> str:
    """sha256 over the relative names and contents of every file in a directory tree (sorted), shortened."""
    h = hashlib.sha256()
    root = Path(path)
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(root)).encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(_CHUNK), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def write_json(path: str | os.PathLike, data: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        "w", dir=path.parent, delete=False, suffix=".tmp", encoding="utf-8"
    ) as f:
        json.dump(data, f, indent=2, ensure_ascii=False, default=str)
        tmp = f.name
    os.replace(tmp, path)
    return path


def read_json(path: str | os.PathLike, default: Any = None) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return default


@contextlib.contextmanager
def directory_lock(directory: str | os.PathLike, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """An exclusive lock on `directory` (flock on the directory itself: no lock file is left behind, and the
    lock ends with the process that held it, even a killed one). Where another process holds it, `on_wait()`
    is called once, then this waits for it."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
