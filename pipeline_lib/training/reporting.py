"""What a training records: its parameters and pre-flight once, its memory plan at every change, and at the
end its summary metrics and artifacts, returned as the stage's `TrainResult`."""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict
from typing import Any

from pipeline_lib import batching, devices, modeling
from pipeline_lib.contracts import TokenizedSplit, TrainMetrics, TrainResult
from pipeline_lib.devices import GIB
from pipeline_lib.files import directory_fingerprint, write_json
from pipeline_lib.training.memory import MemoryPlan
from pipeline_lib.training.state import EVENTS_FILE
from pipeline_lib.training.trainer import Context


def log_start(ctx: Context, pre: dict, plan: MemoryPlan, use_fast: bool | None) -> None:
    """The run's parameters; only those it lacks are logged, so a continued run keeps its first values."""
    job, s = ctx.job, ctx.job.settings
    params = {
        "base_model": job.model.base_model,
        "base_revision": job.model.revision or "local",
        "base_fingerprint": job.model.fingerprint,
        "arch": job.model.arch,
        "device": ctx.device,
        "dataset_fingerprint": job.data.data_fingerprint,
        "tokenized_fingerprint": job.data.fingerprint,
        "quant": s.quantization.model_dump(),
        "lora": {**s.lora.model_dump(), "targets": pre["targets"]},
        "epochs": job.spec.epochs,
        "batch_size": job.spec.batch_size,
        "max_length": job.spec.max_length,
        "long_rows": job.data.long_rows,
        "peak_learning_rate": job.learning_rate,
        "warmup_ratio": s.training.warmup_ratio,
        "scheduler": s.training.lr_scheduler,
        "memory_plan": asdict(plan),
        "tokenizer_use_fast": use_fast,
    }
    if job.spec.max_steps:  # without it the Trainer logs its own max_steps (-1)
        params["max_steps"] = job.spec.max_steps
    ctx.tracker.log_params(ctx.run_id, params)


def token_metrics(split: TokenizedSplit) -> dict[str, float]:
    """`tokens.*`: length statistics and counts of the tokenized training split."""
    ls = split.length_stats
    out = {
        "tokens.mean": ls.mean,
        "tokens.median": ls.median,
        "tokens.p90": ls.p90,
        "tokens.p99": ls.p99,
        "tokens.max": float(ls.max),
        "tokens.rows": float(split.n_rows),
        "tokens.truncated": float(split.n_truncated),
        "tokens.dropped": float(split.n_dropped),
        "tokens.label_tokens": float(split.label_tokens),
        "tokens.total": float(split.padding_free_tokens),
    }
    out["tokens.truncated_share"] = split.n_truncated / split.n_rows if split.n_rows else 0.0
    return out


def log_preflight(ctx: Context, pre: dict, plan: MemoryPlan) -> None:
    q, lr = pre["quantization"], pre["lora"]
    metrics = {
        "preflight.linear_layers": q["linear_layers"],
        "preflight.linear_4bit": q["linear_4bit"],
        "preflight.share_4bit": q["share_4bit"],
        "preflight.footprint_gib": q["footprint_bytes"] / GIB,
        "preflight.bf16_footprint_gib": q["bf16_footprint_bytes"] / GIB,
        "preflight.trainable_params": lr["trainable_params"],
        **token_metrics(ctx.job.data.train),
    }
    ctx.tracker.log_metrics(ctx.run_id, metrics)
    report = {
        "quantization": q,
        "tokenizer": pre["tokenizer"],
        "lora": lr,
        "dims": pre["dims"],
        "memory_plan": asdict(plan),
    }
    ctx.tracker.log_dict(ctx.run_id, report, "preflight.json")


def log_plan(ctx: Context, plan: MemoryPlan, step: int) -> None:
    metrics = {
        "memory.micro_batch": plan.micro_batch,
        "memory.grad_accum": plan.grad_accum,
        "memory.gradient_checkpointing": int(plan.gradient_checkpointing),
    }
    if plan.estimate_gib is not None:
        metrics["memory.estimate_gib"] = plan.estimate_gib
    ctx.tracker.log_metrics(ctx.run_id, metrics, step=step)


def _final_eval(trainer) -> dict:
    """Final held-out metrics; the evaluation at the last step is reused when there is one."""
    if trainer.eval_dataset is None:
        return {}
    step = trainer.state.global_step
    for h in reversed(trainer.state.log_history):
        if "eval_loss" in h and h.get("step") == step:
            return h
    return trainer.evaluate()


def finish(ctx: Context, pre: dict, done: dict, data: dict, resumed_from: int | None) -> TrainResult:
    """Save and check the adapter, evaluate, log the summary metrics and artifacts; the stage's result."""
    job, ts = ctx.job, ctx.job.settings.training
    trainer, model, plan = done["trainer"], done["model"], done["plan"]
    adapter_dir = ctx.out_dir / "adapter"
    model.save_pretrained(adapter_dir)
    data["tokenizer"].save_pretrained(adapter_dir)
    areport = modeling.check_adapter(adapter_dir, done["initial"], job.name)
    eval_metrics = _final_eval(trainer)
    history = trainer.state.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    # The evaluation before the first step (`eval_on_start`): LoRA's B matrices start at zero, so this is the
    # base model itself; a resumed run finds it in the checkpoint's history.
    before = next((h for h in history if "eval_loss" in h and h.get("step") == 0), {})
    tm = done["train_metrics"]
    if "train_loss" in tm and done["start_step"] == 0:
        train_loss = float(tm["train_loss"])
    else:  # the Trainer's figure covers the last attempt's steps only
        train_loss = float(statistics.fmean(losses)) if losses else math.nan
    n_tokens = int(trainer.state.num_input_tokens_seen)
    runtime = float(tm.get("train_runtime", tm["wall_time_s"]))
    this_call_tokens = n_tokens - int(getattr(trainer, "_initial_num_input_tokens_seen", 0) or 0)
    lengths = list(data["train"]["length"])
    pad_share = batching.expected_padding_share(
        lengths, plan.effective_batch, plan.micro_batch, ts.group_by_length, ts.seed
    )
    metrics = TrainMetrics(
        train_loss=train_loss,
        final_loss=float(losses[-1]) if losses else math.nan,
        eval_loss=float(eval_metrics.get("eval_loss", math.nan)),
        perplexity=float(eval_metrics.get("eval_perplexity", math.nan)),
        bits_per_byte=float(eval_metrics.get("eval_bits_per_byte", math.nan)),
        eval_loss_before=float(before.get("eval_loss", math.nan)),
        perplexity_before=float(before.get("eval_perplexity", math.nan)),
        bits_per_byte_before=float(before.get("eval_bits_per_byte", math.nan)),
        train_runtime_s=runtime,
        train_tokens=n_tokens,
        real_tokens_per_s=this_call_tokens / runtime if runtime > 0 else 0.0,
        steps=int(trainer.state.global_step),
        steps_run=done["steps_run"],
        peak_memory_gib=devices.peak_memory_bytes(ctx.device) / GIB,
        padding_share=pad_share,
        oom_events=sum(e["event"] == "out_of_memory" for e in ctx.events),
    )
    summary = {
        k: v
        for k, v in metrics.model_dump().items()
        if k != "eval_loss"  # the Trainer's callback logs it, step by step
        and not (isinstance(v, float) and math.isnan(v))
    }
    ctx.tracker.log_metrics(ctx.run_id, summary, step=int(trainer.state.global_step))
    ctx.tracker.set_tags(ctx.run_id, {"qabot.peak_memory_kind": devices.peak_memory_kind(ctx.device)})
    write_json(ctx.out_dir / "log_history.json", history)
    ctx.tracker.log_artifact(ctx.run_id, ctx.out_dir / "log_history.json")
    ctx.tracker.log_artifact(ctx.run_id, adapter_dir, "adapter")
    if ctx.events:
        write_json(ctx.out_dir / EVENTS_FILE, ctx.events)
        ctx.tracker.log_dict(ctx.run_id, ctx.events, EVENTS_FILE)
    return TrainResult(
        model_name=job.name,
        adapter_dir=str(adapter_dir),
        run_id=ctx.run_id,
        adapter_fingerprint=directory_fingerprint(adapter_dir),
        base_path=job.model.path,
        arch=job.model.arch,
        device=ctx.device,
        metrics=metrics,
        memory_plan=asdict(plan),
        lora_targets=list(done["targets"]),
        trainable_params=int(pre["lora"]["trainable_params"]),
        adapter_check=areport,
        quantization=pre["quantization"],
        resumed=resumed_from is not None,
        resumed_from_step=resumed_from or 0,
        events=ctx.events,
    )


def record_event(ctx: Context, event: dict[str, Any]) -> None:
    """An event (resumed, out_of_memory) in events.json, the run's artifact and its tags."""
    ctx.events.append({"time": time.time(), **event})
    write_json(ctx.out_dir / EVENTS_FILE, ctx.events)
    ctx.tracker.log_dict(ctx.run_id, ctx.events, EVENTS_FILE)
    n_oom = sum(e["event"] == "out_of_memory" for e in ctx.events)
    ctx.tracker.set_tags(ctx.run_id, {"qabot.oom_events": n_oom, "qabot.last_event": event["event"]})
