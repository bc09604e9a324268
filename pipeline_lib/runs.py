"""The parent run of a flow run: one MLflow run per fine-tune-and-compare run, holding its configuration,
the data audit, the retraining decision (`retraining`) and (from `compare.compare_stage`) the comparison with
the models' results; each model's run is its child."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline_lib import retraining
from pipeline_lib.config import RunConfig
from pipeline_lib.contracts import ModelResult, RetrainDecision
from pipeline_lib.data import audit_table, redact_url
from pipeline_lib.files import fingerprint
from pipeline_lib.tracking import TrackingTarget, make_tracker


def recorded_config(config: RunConfig) -> dict[str, Any]:
    """`config` as recorded (params, `config.json`): the data source with its URL secrets redacted."""
    data = config.model_dump(mode="json")
    data["data"]["source"] = redact_url(config.data.source)
    return data


def start_parent_run(
    config: RunConfig, tracking: TrackingTarget, flow_run_id: str | None, flow_run_name: str | None = None
) -> str | None:
    """A new parent run with the config (params, tags and `config.json`); None when nothing is tracked. It is
    named `<config name> · <flow-run name>` (Prefect's name for the run), so reruns can be told apart.
    Nothing recorded holds the secrets of a source URL (`recorded_config`)."""
    if not tracking.enabled:
        return None
    tracker = make_tracker(tracking)
    run_id = tracker.start_run(
        f"{config.name} · {flow_run_name}" if flow_run_name else config.name,
        tags={
            "qabot.profile": config.profile,
            "qabot.flow_run_id": flow_run_id,
            "qabot.config_fingerprint": fingerprint(config),
            retraining.NAME_TAG: config.name,
        },
    )
    tracker.log_params(
        run_id,
        {
            "models": [m.name for m in config.models],
            "profile": config.profile,
            "device": config.device,
            "data.source": redact_url(config.data.source),
            "data.revision": config.data.revision,
        },
    )
    tracker.log_dict(run_id, recorded_config(config), "config.json")
    return run_id


def run_url(tracking: TrackingTarget, run_id: str | None) -> str | None:
    return make_tracker(tracking).run_url(run_id) if run_id and tracking.enabled else None


def log_data(
    tracking: TrackingTarget, run_id: str | None, prepared: dict[str, Any], acquired: dict[str, Any]
) -> None:
    """The data's identity (fingerprint, source hash, rows in and out) and its cleaning audit."""
    if not run_id or not tracking.enabled:
        return
    tracker = make_tracker(tracking)
    audit_path = Path(prepared["audit_path"])
    audit = json.loads(audit_path.read_text(encoding="utf-8"))
    tracker.log_params(
        run_id,
        {
            "dataset_fingerprint": prepared["fingerprint"],
            "dataset_sha256": acquired["sha256"],
            "rows_in": audit["rows_in"],
            "rows_out": audit["rows_out"],
        },
    )
    tracker.log_artifact(run_id, audit_path, "data")
    tracker.log_table(run_id, audit_table(audit), "data/audit_table.json")


def finish_parent_run(
    tracking: TrackingTarget, run_id: str | None, status: str, summary: dict[str, Any] | None = None
) -> None:
    if not run_id or not tracking.enabled:
        return
    tracker = make_tracker(tracking)
    if summary:
        tracker.log_dict(run_id, summary, "summary.json")
    tracker.end_run(run_id, status)


def find_parent_run(tracking_uri: str, flow_run_id: str) -> tuple[str, str | None] | None:
    """(run id, URL) of the parent run a flow run started (tagged `qabot.flow_run_id`), in any experiment."""
    tracker = make_tracker(TrackingTarget(uri=tracking_uri, experiment="Default"))
    return tracker.find_run({"qabot.flow_run_id": flow_run_id})


def last_trained_run(tracking: TrackingTarget, config_name: str) -> retraining.PreviousRun | None:
    """What the newest finished parent run of `config_name` that trained recorded; None when there is none
    (or nothing is tracked)."""
    if not tracking.enabled:
        return None
    tracker = make_tracker(tracking)
    found = tracker.last_run({retraining.NAME_TAG: config_name, retraining.RETRAIN_TAG: "trained"})
    if found is None:
        return None
    run_id, tags = found
    recorded = tracker.load_dict(run_id, retraining.ARTIFACT) or {}
    settings = recorded.get("train_config")
    return retraining.PreviousRun(
        run_id=run_id,
        data_fingerprint=tags.get(retraining.DATA_TAG),
        train_config_fingerprint=tags.get(retraining.CONFIG_TAG),
        train_config=settings if isinstance(settings, dict) else None,
    )


def record_retraining(
    tracking: TrackingTarget, run_id: str | None, decision: RetrainDecision, settings: dict[str, str]
) -> None:
    """The decision as tags of the parent run, and with the training settings as `retraining.json`."""
    if not run_id or not tracking.enabled:
        return
    tracker = make_tracker(tracking)
    tracker.set_tags(run_id, retraining.decision_tags(decision))
    tracker.log_dict(run_id, {**decision.to_json(), "train_config": settings}, retraining.ARTIFACT)


def previous_results(tracking: TrackingTarget, run_id: str | None) -> list[ModelResult] | None:
    """The model results a parent run's comparison recorded (`comparison/results.json`); None when absent."""
    if not run_id or not tracking.enabled:
        return None
    data = make_tracker(tracking).load_dict(run_id, "comparison/results.json")
    try:
        return [ModelResult.model_validate(r) for r in data] if isinstance(data, list) and data else None
    except ValueError:  # recorded by an older version of the contracts
        return None
