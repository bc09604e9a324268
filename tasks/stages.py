"""Thin Prefect tasks: each calls one `pipeline_lib` function and declares caching, retries and artifacts.

Tasks pass paths and fingerprints (small dicts), never live models or datasets. Heavy tasks are cached on
their inputs plus their own source code, with persisted results, so a rerun with unchanged inputs skips
them; training, merging and answering run in a process of their own (`RunConfig.process_isolation`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import INPUTS, NO_CACHE, TASK_SOURCE

from pipeline_lib import isolation, jobs, paths
from pipeline_lib.config import DataConfig, ModelSpec, RunConfig, fingerprint, qabot_home
from pipeline_lib.tracking import TrackingTarget, make_tracker

CACHED = INPUTS + TASK_SOURCE
# Inputs that say where to log, not what to compute: a rerun under a new parent run still hits the cache.
CACHED_TRACKED = CACHED - "parent_run_id" - "run_id" - "tracking"


def _network_error(task, task_run, state) -> bool:
    """Retry downloads only when the outside world failed, not when the data is bad."""
    try:
        state.result()
    except Exception as err:  # noqa: BLE001 - classify any failure
        return bool(getattr(err, "transient", False)) or isinstance(err, TimeoutError)
    return False


def _acquire_key(context, parameters) -> str:
    d: DataConfig = parameters["data"]
    return "acquire:" + paths.source_probe(d.source, d.revision, d.sha256)


@task(
    name="acquire-data",
    cache_key_fn=_acquire_key,
    persist_result=True,
    retries=3,
    retry_delay_seconds=[2, 5, 15],
    retry_condition_fn=_network_error,
)
def acquire_data(data: DataConfig) -> dict:
    from dataclasses import asdict

    from pipeline_lib.data import acquire

    got = acquire(
        data.source,
        qabot_home() / "data" / "raw",
        revision=data.revision,
        sha256=data.sha256,
        max_mb=data.max_download_mb,
        deadline_s=data.download_timeout_s,
    )
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(got).items()}


@task(name="clean-data", cache_policy=CACHED, persist_result=True)
def clean_data(acquired: dict, data: DataConfig) -> dict:
    from pipeline_lib.data import audit_table, clean_acquired

    settings = data.model_dump_json(exclude={"max_download_mb", "download_timeout_s"})  # download limits only
    out = paths.stage_dir("data", "clean", acquired["sha256"], settings)
    prepared = clean_acquired(acquired, out, data)
    audit = prepared.audit_dict()
    create_table_artifact(
        audit_table(audit),
        key="data-audit",
        description=f"Cleaning audit: {audit['rows_in']} rows in, {audit['rows_out']} kept",
    )
    return prepared.to_dict()


@task(
    name="resolve-model",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=[5, 15],
    retry_condition_fn=_network_error,
)
def resolve_model(spec: ModelSpec) -> dict:
    from dataclasses import asdict

    from pipeline_lib.modeling import resolve_base_model

    return asdict(resolve_base_model(spec, qabot_home() / "models" / "base"))


@task(name="tokenize", cache_policy=CACHED, persist_result=True)
def tokenize_data(
    prepared: dict, model: dict, max_length: int, use_fast: bool | None, long_rows: str = "cut"
) -> dict:
    from pipeline_lib.tokenization import tokenize_prepared

    out = paths.stage_dir(
        "tokenized",
        model["name"],
        prepared["fingerprint"],
        model["fingerprint"],
        max_length,
        use_fast,
        long_rows,
    )
    result = tokenize_prepared(
        prepared,
        model["path"],
        max_length,
        out,
        use_fast=use_fast,
        base_model=model["base_model"],
        long_rows=long_rows,
    )
    get_run_logger().info("%s: %s", model["name"], result["train"]["length_stats"])
    return result


@task(name="train", cache_policy=CACHED_TRACKED, persist_result=True)
def train_model(
    model: dict, tokenized: dict, spec: ModelSpec, config: dict, parent_run_id: str | None, tracking: dict
) -> dict:
    out = paths.stage_dir("runs", spec.name, model["fingerprint"], tokenized["fingerprint"], config)
    payload = jobs.train_job(model, tokenized, spec, config, parent_run_id, tracking, out)
    return isolation.call(
        "pipeline_lib.training:train_stage",
        {"job": payload},
        isolate=isolation.wanted(config["process_isolation"], config["device"]),
        log_path=out / "train.log",
        label=f"train {spec.name}",
    )


@task(name="merge", cache_policy=CACHED_TRACKED, persist_result=True)
def merge_model(
    trained: dict, model: dict, config: dict, tracking: dict, registered_name: str | None
) -> dict:
    out = paths.stage_dir(
        "merged", trained["model_name"], trained["adapter_fingerprint"], model["fingerprint"]
    )
    payload = jobs.merge_job(trained, model, config, tracking, registered_name, out)
    return isolation.call(
        "pipeline_lib.merge:merge_stage",
        payload,
        isolate=isolation.wanted(config["process_isolation"], config["device"]),
        log_path=out.with_suffix(".log"),
        label=f"merge {trained['model_name']}",
    )


@task(name="answer-questions", cache_policy=CACHED_TRACKED, persist_result=True)
def answer_questions(
    merged: dict,
    model_name: str,
    inference: dict,
    device: str,
    isolate: bool | str,
    run_id: str | None,
    tracking: dict,
) -> dict:
    out = paths.stage_dir("answers", model_name, merged["fingerprint"], inference)
    result = isolation.call(
        "pipeline_lib.inference:answer_question_set",
        {
            "model_dir": merged["merged_dir"],
            "out_path": str(out / "answers.jsonl"),
            "model_name": model_name,
            "settings": inference,
            "device": device,
        },
        isolate=isolation.wanted(isolate, device),
        log_path=out / "answer.log",
        label=f"answer {model_name}",
    )
    tracker = make_tracker(TrackingTarget(tracking.get("uri"), tracking["experiment"]))
    if run_id:
        tracker.log_artifact(run_id, result["answers_path"])
        tracker.log_metrics(
            run_id, {k: result[k] for k in ("mean_score", "fact_accuracy") if result[k] is not None}
        )
    return result


@task(name="preflight", cache_policy=NO_CACHE)
def preflight(config: RunConfig) -> None:
    from pipeline_lib.preflight import require

    require(config)


@task(name="start-parent-run", cache_policy=NO_CACHE)
def start_parent_run(config: RunConfig, tracking: dict, flow_run_id: str | None) -> str | None:
    tracker = make_tracker(TrackingTarget(tracking.get("uri"), tracking["experiment"]))
    run_id = tracker.start_run(
        config.name,
        tags={
            "qabot.profile": config.profile,
            "qabot.flow_run_id": flow_run_id,
            "qabot.config_fingerprint": fingerprint(config),
        },
    )
    tracker.log_params(
        run_id,
        {
            "models": [m.name for m in config.models],
            "profile": config.profile,
            "device": config.device,
            "data.source": config.data.source,
            "data.revision": config.data.revision,
        },
    )
    tracker.log_dict(run_id, config.model_dump(mode="json"), "config.json")
    url = tracker.run_url(run_id)
    if url:
        get_run_logger().info("MLflow parent run: %s", url)
    return run_id if tracking.get("uri") else None


@task(name="log-data", cache_policy=NO_CACHE)
def log_data(parent_run_id: str | None, prepared: dict, acquired: dict, tracking: dict) -> None:
    from pipeline_lib.data import audit_table

    if not parent_run_id:
        return
    tracker = make_tracker(TrackingTarget(tracking.get("uri"), tracking["experiment"]))
    audit = Path(prepared["audit_path"])
    import json

    a = json.loads(audit.read_text())
    tracker.log_params(
        parent_run_id,
        {
            "dataset_fingerprint": prepared["fingerprint"],
            "dataset_sha256": acquired["sha256"],
            "rows_in": a["rows_in"],
            "rows_out": a["rows_out"],
        },
    )
    tracker.log_artifact(parent_run_id, audit, "data")
    tracker.log_table(parent_run_id, audit_table(a), "data/audit_table.json")


@task(name="compare", cache_policy=NO_CACHE)
def compare_models(results: list[dict], parent_run_id: str | None, tracking: dict, title: str) -> dict:
    from pipeline_lib.compare import build_report

    out = qabot_home() / "reports" / (parent_run_id or fingerprint(results))
    files = build_report(results, out, title=title)
    tracker = make_tracker(TrackingTarget(tracking.get("uri"), tracking["experiment"]))
    url = None
    if parent_run_id:
        for f in files.values():
            tracker.log_artifact(parent_run_id, f, "comparison")
        tracker.set_tags(parent_run_id, {"qabot.child_runs": ",".join(r["train"]["run_id"] for r in results)})
        url = tracker.run_url(parent_run_id)
    report = Path(files["report.md"]).read_text(encoding="utf-8")
    link = f"\n\nPlots and all artifacts: [MLflow run]({url})\n" if url else ""
    create_markdown_artifact(
        report.replace("![loss and learning rate](curves.png)", "") + link,
        key="comparison",
        description=title,
    )
    return {"report_dir": str(out), "files": files, "parent_run_url": url}


@task(name="finish-parent-run", cache_policy=NO_CACHE)
def finish_parent_run(
    parent_run_id: str | None, tracking: dict, status: str, summary: dict[str, Any] | None
) -> None:
    if not parent_run_id:
        return
    tracker = make_tracker(TrackingTarget(tracking.get("uri"), tracking["experiment"]))
    if summary:
        tracker.log_dict(parent_run_id, summary, "summary.json")
    tracker.end_run(parent_run_id, status)
