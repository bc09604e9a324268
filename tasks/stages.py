"""Thin Prefect tasks: each calls one `pipeline_lib` stage and declares caching, retries and artifacts.

A task computes its stage directory (from its inputs' fingerprints, so a rerun finds an interrupted stage's
work), calls the stage — in a process of its own where it holds a model (`RunConfig.process_isolation`) —
and publishes Prefect artifacts. Tasks pass typed records of paths and fingerprints
(`pipeline_lib.contracts`), never live models or datasets. Heavy tasks are cached on their inputs plus their
own source code, with persisted results; inputs that only say where to log (`tracking`, run ids) are left
out of the keys. A cached result whose output files are gone is computed again (`tasks.caching`).
"""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import INPUTS, NO_CACHE, TASK_SOURCE, CacheKeyFnPolicy
from prefect.runtime import flow_run as prefect_flow_run

from pipeline_lib import isolation, paths, runs, training
from pipeline_lib.compare import CompareJob, compare_stage
from pipeline_lib.config import (
    DataConfig,
    InferenceSettings,
    MergeSettings,
    ModelSpec,
    PromotionSettings,
    RunConfig,
    TrainSettings,
    qabot_home,
)
from pipeline_lib.contracts import (
    AnswerResult,
    Comparison,
    MergeResult,
    ModelResult,
    PromotionResult,
    ResolvedModel,
    RetrainDecision,
    TokenizedData,
    TrainResult,
)
from pipeline_lib.files import fingerprint
from pipeline_lib.inference import AnswerJob, answer_stage
from pipeline_lib.merge import MergeJob, merge_stage
from pipeline_lib.promotion import PromoteJob, promote_stage
from pipeline_lib.tokenization import TokenizeJob, tokenize_stage
from pipeline_lib.tracking import TrackingTarget
from pipeline_lib.training import TrainJob
from pipeline_lib.training.job import PROGRESS_FILE
from tasks.caching import heals
from tasks.progress import ProgressSpan, run_reporting

CACHED = INPUTS + TASK_SOURCE
# Inputs that say where to log, not what to compute: a rerun under a new parent run still hits the cache.
CACHED_TRACKED = CACHED - "parent_run_id" - "run_id" - "tracking" - "progress"


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
    cache_policy=heals(CacheKeyFnPolicy(cache_key_fn=_acquire_key)),
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


@task(name="clean-data", cache_policy=heals(CACHED), persist_result=True)
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
def resolve_model(spec: ModelSpec) -> ResolvedModel:
    from pipeline_lib.modeling import resolve_base_model

    return resolve_base_model(spec, qabot_home() / "models" / "base")


# log_prints off: `datasets` hashes functions with dill, which reads their globals from a `dis.dis` printout it
# captures from stdout; a print logged by Prefect instead filled the run's log with bytecode and left dill blind.
@task(name="tokenize", cache_policy=heals(CACHED), persist_result=True, log_prints=False)
def tokenize_data(
    prepared: dict, model: ResolvedModel, max_length: int, use_fast: bool | None, long_rows: str = "cut"
) -> TokenizedData:
    out = paths.stage_dir(
        "tokenized", model.name, prepared["fingerprint"], model.fingerprint, max_length, use_fast, long_rows
    )
    job = TokenizeJob(
        train_path=prepared["train_path"],
        eval_path=prepared["eval_path"],
        data_fingerprint=prepared["fingerprint"],
        model=model,
        max_length=max_length,
        use_fast=use_fast,
        long_rows=long_rows,
        out_dir=str(out),
    )
    result = tokenize_stage(job)
    get_run_logger().info("%s: %s", model.name, result.train.length_stats.model_dump())
    return result


@task(name="train", cache_policy=heals(CACHED_TRACKED), persist_result=True)
def train_model(
    model: ResolvedModel,
    tokenized: TokenizedData,
    spec: ModelSpec,
    settings: TrainSettings,
    parent_run_id: str | None,
    tracking: TrackingTarget,
    progress: ProgressSpan | None = None,
) -> TrainResult:
    out = paths.stage_dir("runs", spec.name, model.fingerprint, tokenized.fingerprint, spec, settings)
    job = TrainJob(
        model=model,
        data=tokenized,
        spec=spec,
        settings=settings,
        out_dir=str(out),
        tracking=tracking,
        parent_run_id=parent_run_id,
    )
    isolate = isolation.wanted(settings.process_isolation, settings.device)
    return run_reporting(  # the run's progress artifact follows the stage's progress file
        lambda: isolation.call(
            training.train_stage, job, isolate=isolate, log_path=out / "train.log", label=f"train {spec.name}"
        ),
        out / PROGRESS_FILE,
        progress,
        spec.name,
    )


@task(name="merge", cache_policy=heals(CACHED_TRACKED), persist_result=True)
def merge_model(
    trained: TrainResult,
    model: ResolvedModel,
    tokenized: TokenizedData,
    settings: TrainSettings,
    merge: MergeSettings,
    tracking: TrackingTarget,
    registered_name: str | None,
) -> MergeResult:
    out = paths.stage_dir("merged", trained.model_name, trained.adapter_fingerprint, model.fingerprint, merge)
    job = MergeJob(
        model=model,
        trained=trained,
        quantization=settings.quantization,
        settings=merge,
        heldout_path=tokenized.eval.source if tokenized.eval else tokenized.train.source,
        device=settings.device,
        out_dir=str(out),
        tracking=tracking,
        registered_name=registered_name,
    )
    isolate = isolation.wanted(settings.process_isolation, settings.device)
    label = f"merge {trained.model_name}"
    return isolation.call(merge_stage, job, isolate=isolate, log_path=out.with_suffix(".log"), label=label)


def _question_set_key(context, parameters) -> str:
    """The question set's content: an edited question file means new answers."""
    from pipeline_lib.questions import question_set_fingerprint

    return question_set_fingerprint(parameters["inference"].question_set)


@task(
    name="answer-questions",
    cache_policy=heals(CACHED_TRACKED + CacheKeyFnPolicy(cache_key_fn=_question_set_key)),
    persist_result=True,
)
def answer_questions(
    model_name: str,
    phase: str,
    model_dir: str,
    model_fingerprint: str,
    inference: InferenceSettings,
    settings: TrainSettings,
    run_id: str | None,
    tracking: TrackingTarget,
) -> AnswerResult:
    """`phase` "before": the base model (`model_dir` its files); "after": the merged model."""
    out = paths.stage_dir("answers", f"{model_name}-{phase}", model_fingerprint, inference)
    job = AnswerJob(
        model_name=model_name,
        phase=phase,
        model_dir=model_dir,
        settings=inference,
        device=settings.device,
        out_path=str(out / ("answers_before.jsonl" if phase == "before" else "answers.jsonl")),
        tracking=tracking,
        run_id=run_id,
    )
    isolate = isolation.wanted(settings.process_isolation, settings.device)
    label = f"answer {model_name} ({phase})"
    return isolation.call(answer_stage, job, isolate=isolate, log_path=out / "answer.log", label=label)


@task(name="promote", cache_policy=NO_CACHE)
def promote_model(
    trained: TrainResult,
    merged: MergeResult,
    answers: AnswerResult,
    registered_name: str | None,
    promotion: PromotionSettings,
    tracking: TrackingTarget,
    verdict: str | None = None,
) -> PromotionResult:
    """The merged model's registered version against the registry's champion; never cached (the registry
    may have moved since). `verdict`: a reviewer's answer (`tasks.approval`) to an earlier "pending"."""
    job = PromoteJob(
        model_name=trained.model_name,
        registered_name=registered_name,
        version=(merged.registered or {}).get("registered_model_version"),
        question_score=answers.question_score,
        bits_per_byte=trained.metrics.bits_per_byte,
        run_id=trained.run_id,
        settings=promotion,
        tracking=tracking,
        verdict=verdict,
    )
    result = promote_stage(job)
    get_run_logger().info("%s: promotion %s: %s", trained.model_name, result.decision, result.reason)
    return result


@task(name="start-progress", cache_policy=NO_CACHE)
def start_progress(models: list[str]) -> str | None:
    """The run's progress artifact (0-100%), moved by each model's training."""
    from prefect.artifacts import create_progress_artifact

    artifact = create_progress_artifact(
        0.0, key="training-progress", description=f"training {', '.join(models)}"
    )
    return str(artifact)


@task(name="preflight", cache_policy=NO_CACHE)
def preflight(config: RunConfig) -> None:
    from pipeline_lib.preflight import require

    require(config)


@task(name="start-parent-run", cache_policy=NO_CACHE)
def start_parent_run(config: RunConfig, tracking: TrackingTarget, flow_run_id: str | None) -> str | None:
    run_id = runs.start_parent_run(config, tracking, flow_run_id, prefect_flow_run.get_name())
    url = runs.run_url(tracking, run_id)
    if url:
        get_run_logger().info("MLflow parent run: %s", url)
    return run_id


@task(name="log-data", cache_policy=NO_CACHE)
def log_data(parent_run_id: str | None, prepared: dict, acquired: dict, tracking: TrackingTarget) -> None:
    runs.log_data(tracking, parent_run_id, prepared, acquired)


@task(name="decide-retraining", cache_policy=NO_CACHE)
def decide_retraining(
    config: RunConfig,
    prepared: dict,
    resolved: dict[str, ResolvedModel],
    parent_run_id: str | None,
    tracking: TrackingTarget,
) -> RetrainDecision:
    """Train, or skip because nothing changed since the last trained run (`pipeline_lib.retraining`)."""
    from pipeline_lib.retraining import decide_retraining as decide
    from pipeline_lib.retraining import train_config

    settings = train_config(config, {name: m.fingerprint for name, m in resolved.items()})
    previous = runs.last_trained_run(tracking, config.name)
    decision = decide(config.retrain, previous, prepared["fingerprint"], settings)
    runs.record_retraining(tracking, parent_run_id, decision, settings)
    get_run_logger().info("%s: %s", "training" if decision.train else "training skipped", decision.reason)
    return decision


@task(name="previous-results", cache_policy=NO_CACHE)
def previous_results(run_id: str | None, tracking: TrackingTarget) -> list[ModelResult] | None:
    """The model results the parent run `run_id` recorded with its comparison; None when absent."""
    return runs.previous_results(tracking, run_id)


@task(name="previous-comparison", cache_policy=NO_CACHE)
def previous_comparison(run_id: str | None, tracking: TrackingTarget) -> Comparison:
    """The comparison of the parent run `run_id`, where it was written, as it is."""
    report_dir = qabot_home() / "reports" / str(run_id)
    files = {p.name: str(p) for p in sorted(report_dir.glob("*"))} if report_dir.is_dir() else {}
    return Comparison(report_dir=str(report_dir), files=files, parent_run_url=runs.run_url(tracking, run_id))


@task(name="compare", cache_policy=NO_CACHE)
def compare_models(
    results: list[ModelResult], parent_run_id: str | None, tracking: TrackingTarget, title: str, data: str
) -> Comparison:
    out = (
        qabot_home()
        / "reports"
        / (parent_run_id or fingerprint([r.model_dump(mode="json") for r in results]))
    )
    job = CompareJob(
        results=results,
        out_dir=str(out),
        title=title,
        data=data,
        tracking=tracking,
        parent_run_id=parent_run_id,
    )
    comparison = compare_stage(job)
    create_table_artifact(
        comparison.scoreboard, key="scoreboard", description=f"{title}: best {comparison.best_model}"
    )
    report = Path(comparison.files["report.md"]).read_text(encoding="utf-8")
    url = comparison.parent_run_url  # the plots live in MLflow: a Prefect artifact cannot show local files
    text = "\n".join(line for line in report.splitlines() if not line.startswith("!["))
    link = f"\n\nPlots and all artifacts: [MLflow parent run]({url})\n" if url else ""
    create_markdown_artifact(text + link, key="comparison", description=title)
    return comparison


@task(name="finish-parent-run", cache_policy=NO_CACHE)
def finish_parent_run(
    parent_run_id: str | None, tracking: TrackingTarget, status: str, summary: dict | None
) -> None:
    runs.finish_parent_run(tracking, parent_run_id, status, summary)
