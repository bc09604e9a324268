"""Data-aware retraining: must this run fine-tune again, or are the last trained models still current?

Every parent run records what its models are made of: the fingerprint of the prepared data
(`qabot.data_fingerprint`) and of the training settings (`qabot.train_config_fingerprint`; the settings
themselves in its `retraining.json` artifact), and whether it trained (`qabot.retrain`: trained | skipped, with
`qabot.retrain_reason` and `qabot.previous_run_id`). A run compares its own fingerprints with those of the last
finished run of the same config name that trained (`runs.last_trained_run`): `decide_retraining` below, pure.
With `retrain: on_change` it skips fine-tuning when both are equal; with `always` it trains anyway and says
what changed, or that nothing did.

Training settings are what makes the trained models: each model's spec and the fingerprint of its resolved
base-model files (a new upstream revision counts as a change), `training`, `lora`, `quantization`, `merge` and
the device. Left out: the run's name, `tracking`, `inference` (the question set is what the models are asked,
not what they are made of: an edited question set alone does not retrain), process isolation, the data settings
(their effect is in the data fingerprint) and the code (a changed trainer alone does not retrain).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from pipeline_lib.config import RunConfig
from pipeline_lib.contracts import RetrainDecision
from pipeline_lib.files import fingerprint

DATA_TAG = "qabot.data_fingerprint"
CONFIG_TAG = "qabot.train_config_fingerprint"
RETRAIN_TAG = "qabot.retrain"  # trained | skipped
REASON_TAG = "qabot.retrain_reason"
PREVIOUS_TAG = "qabot.previous_run_id"
NAME_TAG = "qabot.config_name"
ARTIFACT = "retraining.json"  # the decision with the full training settings, on every parent run
MAX_KEYS_NAMED = 8


class PreviousRun(BaseModel):
    """What the last trained run of a config name recorded (`runs.last_trained_run`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    run_id: str
    data_fingerprint: str | None
    train_config_fingerprint: str | None
    train_config: dict[str, str] | None = None  # None: the settings were not recorded (keys cannot be named)


def _flatten(data: Any, prefix: str, out: dict[str, str]) -> None:
    if isinstance(data, dict):
        for k, v in data.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    else:
        out[prefix] = json.dumps(data, sort_keys=True)


def train_config(config: RunConfig, base_files: dict[str, str]) -> dict[str, str]:
    """The training settings of `config` (module docstring), flat: `models.<name>.<field>`, `training.<field>`,
    ...; each value JSON. `base_files`: each model's resolved base-model fingerprint, by model name."""
    out: dict[str, str] = {}
    for spec in config.models:
        _flatten(spec.model_dump(mode="json", exclude={"name"}), f"models.{spec.name}", out)
        out[f"models.{spec.name}.base_files"] = json.dumps(base_files.get(spec.name))
    for section in ("training", "lora", "quantization", "merge"):
        _flatten(getattr(config, section).model_dump(mode="json"), section, out)
    out["device"] = json.dumps(config.device)
    return out


def _model_of(key: str) -> str | None:
    return key.removeprefix("models.").rsplit(".", 1)[0] if key.startswith("models.") else None


def changed_settings(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """The keys whose value differs, sorted; a model present on one side only is one entry, `models.<name>
    (added)` or `(removed)`."""
    models_before = {_model_of(k) for k in before} - {None}
    models_after = {_model_of(k) for k in after} - {None}
    out: list[str] = []
    for key in sorted(before.keys() | after.keys()):
        if before.get(key) == after.get(key):
            continue
        model = _model_of(key)
        if model is not None and model not in models_before:
            key = f"models.{model} (added)"
        elif model is not None and model not in models_after:
            key = f"models.{model} (removed)"
        if key not in out:
            out.append(key)
    return out


def _named(keys: list[str]) -> str:
    more = len(keys) - MAX_KEYS_NAMED
    return ", ".join(keys[:MAX_KEYS_NAMED]) + (f" and {more} more" if more > 0 else "")


def decide_retraining(
    mode: Literal["always", "on_change"],
    previous: PreviousRun | None,
    data_fingerprint: str,
    settings: dict[str, str],
) -> RetrainDecision:
    """Train or skip, and why: skip only with `on_change` when the data and training settings fingerprints
    equal `previous`'s (the last finished run of this config name that trained)."""
    config_fp = fingerprint(settings)
    same = dict(mode=mode, data_fingerprint=data_fingerprint, train_config_fingerprint=config_fp)
    if previous is None:
        return RetrainDecision(train=True, reason="no previous successful run", **same)
    reasons, changed = [], []
    if previous.data_fingerprint != data_fingerprint:
        reasons.append(f"data changed ({previous.data_fingerprint or '?'} → {data_fingerprint})")
        changed.append("data")
    if previous.train_config_fingerprint != config_fp:
        keys = changed_settings(previous.train_config, settings) if previous.train_config is not None else []
        reasons.append("training settings changed" + (f": {_named(keys)}" if keys else ""))
        changed += keys or ["training settings"]
    since = dict(previous_run_id=previous.run_id, changed=changed, **same)
    if reasons:
        return RetrainDecision(train=True, reason="; ".join(reasons), **since)
    unchanged = f"data and training settings unchanged since run {previous.run_id}"
    if mode == "always":
        return RetrainDecision(train=True, reason=f"retrain: always ({unchanged})", **since)
    return RetrainDecision(train=False, reason=unchanged, **since)


def decision_tags(decision: RetrainDecision) -> dict[str, str]:
    """The parent run's tags for `decision` (module docstring)."""
    tags = {
        DATA_TAG: decision.data_fingerprint,
        CONFIG_TAG: decision.train_config_fingerprint,
        RETRAIN_TAG: "trained" if decision.train else "skipped",
        REASON_TAG: decision.reason[:1000],
    }
    if decision.previous_run_id:
        tags[PREVIOUS_TAG] = decision.previous_run_id
    return tags
