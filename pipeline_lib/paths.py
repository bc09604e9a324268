"""Where each stage writes under $QABOT_HOME, and cheap probes that tell whether an input changed."""

from __future__ import annotations

import hashlib
import os
import uuid
from importlib import resources
from pathlib import Path

from pipeline_lib.config import qabot_home
from pipeline_lib.files import fingerprint


def stage_dir(stage: str, name: str, *keys: object, home: Path | None = None) -> Path:
    """`$QABOT_HOME/<stage>/<name>-<hash of keys>`: the same inputs always map to the same directory, which
    is what lets a rerun find the checkpoints and MLflow run of an interrupted training."""
    base = home or qabot_home()
    parts = [k.model_dump(mode="json") if hasattr(k, "model_dump") else str(k) for k in keys]
    return base / stage / f"{name}-{fingerprint(parts)}"


def source_probe(source: str, revision: str | None = None, sha256: str | None = None) -> str:
    """A cheap key that changes when the data behind `source` may have changed.

    Local files: path, size and modification time. Shipped files: their content hash. URLs with an expected
    sha256: that hash and a hash of the URL with its secrets redacted (the key is stored in plain text, and a
    re-signed URL of the same pinned file can reuse it). Hugging Face ids pinned to a 40-character commit: the
    commit. Anything else cannot be known without fetching it, so the key is unique (never reused)."""
    if source.startswith("builtin:"):
        f = resources.files("pipeline_lib.assets").joinpath(source.removeprefix("builtin:"))
        data = f.read_bytes() if f.is_file() else b"missing"
        return "builtin:" + hashlib.sha256(data).hexdigest()
    if source.startswith(("http://", "https://")):
        if not sha256:
            return f"unique:{uuid.uuid4()}"
        from pipeline_lib.data.errors import redact_url

        return f"url:{hashlib.sha256(redact_url(source).encode()).hexdigest()[:32]}:{sha256}"
    p = Path(source).expanduser()
    if p.exists():
        st = p.stat()
        return f"file:{p.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    if revision and len(revision) == 40:
        return f"hf:{source}:{revision}"
    if os.sep in source and not source.startswith("hf://") and source.count("/") != 1:
        return f"missing:{p}:{uuid.uuid4()}"  # a path that does not exist: let the stage say so
    return f"unique:{uuid.uuid4()}"
