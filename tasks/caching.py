"""Cached results that heal: a cached task result whose recorded outputs are gone is computed again.

A heavy task's cached result is a record of paths under $QABOT_HOME (the acquired file, the clean data and
its audit, the tokenized splits, the adapter, the merged model, the answers). When those files are deleted,
a plain cache hit would hand the next tasks paths that no longer exist: empty curves, a missing audit.json,
on every rerun. `Healing` wraps a task's cache policy: before Prefect looks its key up, it reads the record
cached under that key and checks that every output the record names (`recorded_outputs`) still exists. When
one is missing, it logs a warning and moves to the next key of a chain (key, key.1, key.2, ...) that holds
nothing yet, so the task runs again and its new result is cached there; a later run walks the chain to its
newest record and uses that one. Nothing else changes: the same inputs give the same chain.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy
from pydantic import BaseModel

MAX_HEALS = 100  # bound on the chain walked (one link per time the outputs were found gone)


def recorded_outputs(result: Any) -> list[str]:
    """The files and directories a cached result says it produced: string fields named `path`, `*_path` or
    `*_dir`, of a dict result and of a record and the records inside it (not of its free-form dicts)."""
    if isinstance(result, dict):
        items = result.items()
    elif isinstance(result, BaseModel):
        items = ((name, getattr(result, name)) for name in type(result).model_fields)
    else:
        return []
    out: list[str] = []
    for name, value in items:
        if isinstance(value, str) and (name == "path" or name.endswith(("_path", "_dir"))):
            out.append(value)
        elif isinstance(value, BaseModel):
            out += recorded_outputs(value)
    return out


def missing_outputs(result: Any) -> list[str]:
    return [p for p in recorded_outputs(result) if not Path(p).exists()]


def _logger(task_ctx: Any) -> logging.Logger | logging.LoggerAdapter:
    try:
        from prefect.logging import get_run_logger

        return get_run_logger()
    except Exception:  # noqa: BLE001 - outside a run (tests): the module's logger
        return logging.getLogger(__name__)


@dataclass
class Healing(CachePolicy):
    """`policy`'s key, or the next key of its chain when the result cached there names missing outputs."""

    policy: CachePolicy | None = None

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs):
        key = self.policy.compute_key(task_ctx, inputs, flow_parameters, **kwargs)
        store = getattr(task_ctx, "result_store", None)
        if key is None or store is None:
            return key
        n = 0
        while n < MAX_HEALS and store.exists(f"{key}.{n + 1}"):
            n += 1
        current = f"{key}.{n}" if n else key
        if not n and not store.exists(key):
            return key  # nothing cached yet
        try:
            gone = missing_outputs(store.read(current).result)
        except Exception as err:  # noqa: BLE001 - a record that cannot be read is as good as gone
            gone = [f"(the cached record: {type(err).__name__})"]
        if not gone:
            return current
        name = getattr(getattr(task_ctx, "task", None), "name", "task")
        _logger(task_ctx).warning(
            "%s: the cached result names outputs that are gone (%s); computing it again",
            name,
            ", ".join(gone[:3]) + (f" and {len(gone) - 3} more" if len(gone) > 3 else ""),
        )
        return f"{key}.{n + 1}"


def heals(policy: CachePolicy) -> Healing:
    """`policy`, healing (see the module docstring)."""
    return Healing(policy=policy)
