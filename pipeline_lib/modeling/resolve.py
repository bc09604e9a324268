"""Resolving a base model: a tiny model built here, a local directory, or a Hugging Face id pinned to a commit."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from pipeline_lib.config import ModelSpec
from pipeline_lib.contracts import ResolvedModel
from pipeline_lib.files import directory_fingerprint, fingerprint
from pipeline_lib.modeling.errors import ModelSourceError
from pipeline_lib.netutil import call_with_deadline, one_line
from pipeline_lib.tiny import is_tiny, materialize_tiny

_CONFIG_PATTERNS = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
]


_SAFETENSORS_PATTERNS = ["model*.safetensors", "model.safetensors.index.json"]


_BIN_PATTERNS = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]


TOKENIZER_FILES = tuple(p for p in _CONFIG_PATTERNS if p not in ("config.json", "generation_config.json"))


def _weight_patterns(filenames: Sequence[str]) -> list[str]:
    """Safetensors weights when the repository has them, else PyTorch .bin weights."""
    from fnmatch import fnmatch

    if any(fnmatch(f, p) for f in filenames for p in _SAFETENSORS_PATTERNS):
        return _SAFETENSORS_PATTERNS
    if any(fnmatch(f, p) for f in filenames for p in _BIN_PATTERNS):
        return _BIN_PATTERNS
    return []


def _model_type(path: Path) -> str:
    cfg = path / "config.json"
    if not cfg.is_file():
        raise ModelSourceError(f"{path}: no config.json, not a model directory")
    return str(json.loads(cfg.read_text()).get("model_type", "unknown"))


def resolve_base_model(
    spec: ModelSpec, cache_dir: Path, timeout: float = 10, hub_cache_dir: Path | None = None
) -> ResolvedModel:
    """Find (and if needed download) `spec.base_model`; pin its exact version.

    - `tiny:ARCH`: built once per recipe in the shared tiny-model cache (`tiny.default_cache_dir()`).
    - an existing local directory: used in place, fingerprinted by content.
    - otherwise a Hugging Face id: the revision is resolved to a commit sha first (one request, bounded by
      `timeout`), then config, tokenizer and weights of that commit are downloaded (safetensors when the
      repository has them, else .bin) into `hub_cache_dir` (default: the Hugging Face cache). When the Hub
      cannot be reached, a snapshot already in that cache is used; otherwise `ModelSourceError` is raised.
    """
    base = spec.base_model
    if is_tiny(base):
        path, fp = materialize_tiny(base)
        return _resolved(spec, path, None, fp, "tiny")
    local = Path(base).expanduser()
    if local.is_dir():
        local = local.resolve()
        return _resolved(spec, local, None, directory_fingerprint(local), "local")
    if local.exists() or base.startswith((".", "/", "~")):
        raise ModelSourceError(f"{spec.name}: {base} is not a model directory")
    return _resolve_hub(spec, timeout, hub_cache_dir)


def _resolve_hub(spec: ModelSpec, timeout: float, hub_cache_dir: Path | None) -> ResolvedModel:
    from huggingface_hub import HfApi, snapshot_download

    repo = spec.base_model
    cache = str(hub_cache_dir) if hub_cache_dir else None
    try:
        info = call_with_deadline(
            lambda: HfApi().model_info(repo, revision=spec.revision, timeout=timeout), timeout + 2
        )
    except Exception as err:  # any failure: offline, unknown repo, gated, timeout
        reason = one_line(err)
        cached = _cached_snapshot(repo, spec.revision, cache)
        if cached is None:
            raise ModelSourceError(f"cannot fetch {repo} from the Hugging Face Hub: {reason}") from None
        fp = fingerprint({"repo": repo, "sha": cached.name, "files": _listing(cached)})
        return _resolved(spec, cached, cached.name, fp, "hub-cache")
    sha = info.sha
    filenames = [s.rfilename for s in (info.siblings or [])]
    weights = _weight_patterns(filenames)
    if not weights:
        raise ModelSourceError(f"{repo}@{sha}: the repository has no safetensors or .bin weights")
    try:
        path = Path(
            snapshot_download(
                repo,
                revision=sha,
                cache_dir=cache,
                allow_patterns=_CONFIG_PATTERNS + weights,
                etag_timeout=timeout,
            )
        )
    except Exception as err:
        raise ModelSourceError(f"cannot download {repo}@{sha}: {one_line(err)}") from None
    return _resolved(spec, path, sha, fingerprint({"repo": repo, "sha": sha, "files": _listing(path)}), "hub")


def _resolved(spec: ModelSpec, path: Path, revision: str | None, fp: str, source: str) -> ResolvedModel:
    return ResolvedModel(
        name=spec.name,
        base_model=spec.base_model,
        path=str(path),
        revision=revision,
        fingerprint=fp,
        arch=_model_type(path),
        source=source,
    )


def _cached_snapshot(repo: str, revision: str | None, cache: str | None) -> Path | None:
    from huggingface_hub import snapshot_download

    try:
        path = Path(
            snapshot_download(
                repo,
                revision=revision,
                cache_dir=cache,
                local_files_only=True,
                allow_patterns=_CONFIG_PATTERNS + _SAFETENSORS_PATTERNS + _BIN_PATTERNS,
            )
        )
    except Exception:  # not cached
        return None
    if not (path / "config.json").is_file() or not _weight_patterns(_listing(path)):
        return None
    return path


def _listing(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
