"""`--set KEY=VALUE` overrides, and the config loader of the command line (`load_run_config`).

A key is a dotted path into the resolved config (`training.learning_rate`, `models.0.max_steps`); a value is
YAML (`3`, `1e-4`, `null`, `[q_proj, v_proj]`, `{name: x, base_model: "tiny:llama"}`). Every mistake is one
line naming the key: an unknown key (with the closest known one), an index past the end of a list, a key
below a plain value, a value that is not YAML or not of the key's type.

`profile=NAME` is not an edit of one field: it picks the preset the config starts from. The config is loaded
again from that preset (a `--config` file's settings applied over it) before the other overrides, so the
settings always are the preset that `profile` (and the MLflow tag qabot.profile) names.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence
from typing import Any

import yaml
from pydantic import ValidationError

from pipeline_lib.config import PROFILES, ConfigError, RunConfig, load_config
from pipeline_lib.config_checks import choose


def _split(item: str) -> tuple[str, str]:
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. training.learning_rate=1e-4")
    return key, raw


def _value(key: str, raw: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML") from None


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a true/false value"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "empty (null)" if value is None else type(value).__name__


def _set(data: dict[str, Any], key: str, value: Any) -> None:
    """Put `value` at the dotted `key` of `data` (a config dump: every field is present)."""
    node: Any = data
    parts = key.split(".")
    for depth, part in enumerate(parts):
        here = ".".join(parts[:depth]) or "the config"
        last = depth == len(parts) - 1
        if isinstance(node, dict):
            if part not in node:
                close = difflib.get_close_matches(part, list(node), n=1, cutoff=0.6)
                hint = f"did you mean {'.'.join([*parts[:depth], close[0]])!r}?" if close else (
                    f"known keys: {', '.join(node)}"
                )  # fmt: skip
                raise ConfigError(f"--set {key}: unknown key {part!r} in {here}; {hint}")
        elif isinstance(node, list):
            if not (part.isdigit() and int(part) < len(node)):
                raise ConfigError(
                    f"--set {key}: {here} has {len(node)} entries, so {part!r} is not one of its indexes "
                    f"(0 to {len(node) - 1})"
                )
            part = int(part)  # type: ignore[assignment]
        else:
            raise ConfigError(f"--set {key}: {here} is {_kind(node)} ({node!r}), not a section with keys")
        if last:
            node[part] = value
        else:
            node = node[part]


def _validate(data: dict[str, Any], keys: list[str]) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
        msg = first["msg"].removeprefix("Value error, ")
        given = [k for k in keys if loc == k or loc.startswith(k + ".")]
        where = f"--set {given[-1]}" if given else "--set"
        shown = f"{loc}: " if not given or loc != given[-1] else ""
        got = first.get("input")
        shown_value = isinstance(got, (str, int, float, bool)) and str(got) not in msg
        value = f" (got {got!r})" if shown_value else ""
        raise ConfigError(f"{where}: {shown}{msg}{value}") from None


def apply_overrides(config: RunConfig, items: Sequence[str]) -> RunConfig:
    """`config` with each `KEY=VALUE` of `items` applied in order (a later one wins), validated as a whole."""
    data = config.model_dump(mode="json")
    keys = []
    for item in items:
        key, raw = _split(item)
        _set(data, key, _value(key, raw))
        keys.append(key)
    return _validate(data, keys) if keys else config


def load_run_config(
    profile: str | None = None, path: str | os.PathLike | None = None, sets: Sequence[str] = ()
) -> RunConfig:
    """The config of `qabot run|demo|config show`: a preset (`profile`, default smoke) or a file (`path`,
    which may start from a preset), then the `--set` overrides; `profile=NAME` among them picks the preset."""
    rest, chosen = [], None
    for item in sets:
        key, raw = _split(item)
        if key != "profile":
            rest.append(item)
            continue
        chosen = _value(key, raw)
        if chosen not in PROFILES:
            raise ConfigError(f"--set profile: {choose('preset', chosen, PROFILES)}")
    if path is not None:
        config = load_config(profile=chosen or profile, path=path, force_profile=chosen is not None)
    else:
        config = load_config(chosen or profile or "smoke")
    return apply_overrides(config, rest)
