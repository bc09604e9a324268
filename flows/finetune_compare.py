"""The main flow: data → per model (tokenize → QLoRA train → merge → answer → promote) → comparison.

Composition only: every step is a task in `tasks.stages`. Models are trained one after another on the one
GPU; each heavy step is cached, so a rerun with unchanged data and settings only rebuilds the report.
From its retraining decision to its end, a run holds a slot of the `qabot-gpu` concurrency limit
(`tasks.gpu`): runs started together train one after the other, and the later one decides knowing what the
earlier one trained. With `retrain: on_change`, a run whose data and training settings equal those of the last
trained run skips fine-tuning and ends Completed with the reason as its message. A promotion that waits for a
reviewer (`promotion.approval`) pauses the run once the report is built, and gives the slot back first: a run
waiting for a person never keeps another from training (that one, deciding meanwhile, retrains, since the
paused run has not finished).
"""

from __future__ import annotations

from contextlib import ExitStack

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.states import Completed, State

from pipeline_lib.config import RunConfig, load_config
from pipeline_lib.contracts import ModelResult
from pipeline_lib.data import redact_url
from pipeline_lib.tracking import TrackingTarget, target_from_env
from tasks import approval, stages
from tasks.gpu import gpu_slot
from tasks.progress import ProgressSpan
from tasks.progress import update as progress_update

DEFAULT_CONFIG = load_config("smoke")


def _tracking(config: RunConfig) -> TrackingTarget:
    t = config.tracking
    return target_from_env(
        t.experiment,
        system_metrics=t.system_metrics,
        system_metrics_interval_s=t.system_metrics_interval_s,
        log_models=t.log_merged_model,
    )


@flow(name="finetune-compare", log_prints=True, validate_parameters=True)
def finetune_compare(config: RunConfig = DEFAULT_CONFIG) -> dict:
    """Fine-tune every model of `config` with QLoRA, merge, answer the question set and compare."""
    logger = get_run_logger()
    tracking = _tracking(config)
    settings = config.train_settings()
    stages.preflight(config)
    parent = stages.start_parent_run(config, tracking, flow_run.get_id())
    held = ExitStack()
    try:
        acquired = stages.acquire_data(config.data)
        prepared = stages.clean_data(acquired, config.data)
        stages.log_data(parent, prepared, acquired, tracking)
        resolved = {spec.name: stages.resolve_model(spec) for spec in config.models}
        held.enter_context(gpu_slot(flow_run.get_id()))  # one run per GPU: waits while others train
        decision = stages.decide_retraining(config, prepared, resolved, parent, tracking)
        if not decision.train:
            return _skip_training(config, decision, prepared, parent, tracking)
        progress = stages.start_progress([m.name for m in config.models])
        share = 100.0 / len(config.models)
        results: list[ModelResult] = []
        promotions = {}
        for k, spec in enumerate(config.models):
            model = resolved[spec.name]
            tokenized = stages.tokenize_data(
                prepared, model, spec.max_length, spec.use_fast_tokenizer, config.training.long_rows
            )
            span = ProgressSpan(artifact_id=progress, start=k * share, share=share)
            trained = stages.train_model(model, tokenized, spec, settings, parent, tracking, span)
            before = stages.answer_questions(
                spec.name,
                "before",
                model.path,
                model.fingerprint,
                config.inference,
                settings,
                trained.run_id,
                tracking,
            )
            registered = f"{config.name}-{spec.name}" if config.tracking.register_models else None
            merged = stages.merge_model(
                trained, model, tokenized, settings, config.merge, tracking, registered
            )
            answers = stages.answer_questions(
                spec.name,
                "after",
                merged.merged_dir,
                merged.fingerprint,
                config.inference,
                settings,
                trained.run_id,
                tracking,
            )
            progress_update(span, 1.0, f"{spec.name} trained")  # also when its training was Cached
            promotions[spec.name] = stages.promote_model(
                trained, merged, answers, registered, config.promotion, tracking
            )
            results.append(
                ModelResult(
                    model_name=spec.name,
                    base_model=spec.base_model,
                    model=model,
                    tokenized=tokenized,
                    train=trained,
                    merge=merged,
                    answers=answers,
                    answers_before=before,
                )
            )
            m = trained.metrics
            logger.info(
                "%s: held-out bits per byte %.3f -> %.3f, question score %s -> %s",
                spec.name,
                m.bits_per_byte_before,
                m.bits_per_byte,
                before.question_score,
                answers.question_score,
            )
        title = f"{config.name}: {', '.join(r.model_name for r in results)}"
        comparison = stages.compare_models(results, parent, tracking, title, _data_line(config, prepared))
        if any(p.decision == "pending" for p in promotions.values()):
            held.close()  # a run waiting for a person never keeps another from training
        for r in results:  # a reviewer decides with the report at hand
            if promotions[r.model_name].decision == "pending":
                verdict = approval.ask_reviewer(promotions[r.model_name], config.promotion.approval_timeout_s)
                promotions[r.model_name] = stages.promote_model(
                    r.train, r.merge, r.answers, promotions[r.model_name].registered_name,
                    config.promotion, tracking, verdict,
                )  # fmt: skip
        summary = {
            **_summary_head(parent, comparison),
            "models": {
                r.model_name: {
                    "child_run_id": r.train.run_id,
                    **r.train.metrics.model_dump(),
                    "question_score_before": r.answers_before.question_score if r.answers_before else None,
                    "question_score": r.answers.question_score,
                    "promotion": promotions[r.model_name].model_dump(
                        include={"decision", "reason", "version", "champion"}
                    ),
                }
                for r in results
            },
        }
        stages.finish_parent_run(parent, tracking, "FINISHED", summary)
        return summary
    except BaseException:
        stages.finish_parent_run(parent, tracking, "FAILED", None)
        raise
    finally:
        held.close()


def _skip_training(config: RunConfig, decision, prepared: dict, parent: str | None, tracking) -> State:
    """Nothing changed since the last trained run: no model is trained. The comparison is rebuilt under this
    run from that run's recorded results (`refresh_comparison`), or this run points at that run's report."""
    results = stages.previous_results(decision.previous_run_id, tracking)
    if config.refresh_comparison and results:
        title = f"{config.name}: {', '.join(r.model_name for r in results)} (trained in run {decision.previous_run_id})"
        comparison = stages.compare_models(results, parent, tracking, title, _data_line(config, prepared))
    else:
        comparison = stages.previous_comparison(decision.previous_run_id, tracking)
    summary = {
        **_summary_head(parent, comparison),
        "retrain": decision.to_json(),
        "models": {
            r.model_name: {"child_run_id": r.train.run_id, "question_score": r.answers.question_score}
            for r in results or []
        },
    }
    stages.finish_parent_run(parent, tracking, "FINISHED", summary)
    return Completed(message=f"training skipped: {decision.reason}", data=summary)


def _data_line(config: RunConfig, prepared: dict) -> str:
    """The report's data line: the source (its URL secrets redacted) and the row counts."""
    return (
        f"{redact_url(config.data.source)}, {prepared['rows_in']} rows in, "
        f"{prepared['n_train']} trained on, {prepared['n_eval']} held out"
    )


def _summary_head(parent: str | None, comparison) -> dict:
    """What every run's summary starts with: where its runs and report are."""
    return {
        "flow_run_id": str(flow_run.get_id()),
        "parent_run_id": parent,
        "parent_run_url": comparison.parent_run_url,
        "report_dir": comparison.report_dir,
        "best_model": comparison.best_model,
    }
