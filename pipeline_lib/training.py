"""QLoRA fine-tuning of one model: pre-flight, memory plan, the transformers Trainer, faults, resume.

`run_training(job)` is the whole stage for one model. It is written to run in its own process (see
`pipeline_lib.isolation`) so that every byte of GPU memory is released before the next model starts.
It logs to one MLflow child run whose id is kept in the output directory: a rerun after a kill resumes the
last checkpoint and continues that same run without logging any step twice.
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline_lib.config import LoraSettings, ModelSpec, QuantizationConfig, TrainingSettings
from pipeline_lib.tracking import TrackingTarget, make_tracker, write_json

STATE_FILE = "run_state.json"
RESULT_FILE = "train_result.json"
GIB = 1024**3


@dataclass
class TrainJob:
    """Everything one training needs, as plain data (it crosses a process boundary)."""

    model_name: str
    base_model: str  # id as configured (Hub id / tiny:arch / path)
    base_path: str  # local directory of the resolved base model
    base_revision: str | None
    base_fingerprint: str
    arch: str
    train_dataset: str  # datasets.save_to_disk directory
    eval_dataset: str | None
    data_fingerprint: str
    tokenized_fingerprint: str
    out_dir: str
    spec: dict
    training: dict
    lora: dict
    quantization: dict
    device: str = "auto"
    tracking_uri: str | None = None
    experiment: str = "qabot"
    parent_run_id: str | None = None
    system_metrics: bool = True
    use_fast_tokenizer: bool | None = None
    extra_tags: dict = field(default_factory=dict)
    token_stats: dict = field(default_factory=dict)  # length statistics of the tokenized training split

    def model_spec(self) -> ModelSpec:
        return ModelSpec.model_validate(self.spec)

    def training_settings(self) -> TrainingSettings:
        return TrainingSettings.model_validate(self.training)


@dataclass
class MemoryPlan:
    """How one optimizer step of `batch_size` rows is split to fit the memory budget."""

    micro_batch: int
    grad_accum: int
    gradient_checkpointing: bool
    tokens_per_micro_batch: int | None
    budget_gib: float | None
    reason: str

    @property
    def effective_batch(self) -> int:
        return self.micro_batch * self.grad_accum


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device is 'cuda' but no CUDA GPU is visible (set device: cpu or auto)")
    return device


def _divisors_desc(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def plan_memory(
    batch_size: int,
    max_length: int,
    settings: TrainingSettings,
    *,
    device: str,
    budget_gib: float | None,
    weights_gib: float,
    hidden_size: int,
    num_layers: int,
    vocab_size: int,
) -> MemoryPlan:
    """Choose micro-batch, accumulation and gradient checkpointing so one step keeps `batch_size` rows
    and the estimated peak stays under `budget_gib` (CPU: no budget, the whole batch at once).

    The estimate is deliberately simple and conservative: 4-bit weights + LoRA state, plus per token
    the activations (~34·hidden bytes per layer with bf16, or 2·hidden per layer with checkpointing),
    plus the logits and their float32 loss (vocab·10 bytes) — the largest tensors for a 250k vocabulary.
    """
    gc_setting = settings.gradient_checkpointing
    if device != "cuda" or budget_gib is None:
        gc = gc_setting == "on"
        tokens = settings.tokens_per_micro_batch or batch_size * max_length
        return MemoryPlan(batch_size, 1, gc, tokens, budget_gib, "no GPU memory budget")
    usable = budget_gib * 0.85 - weights_gib - 0.6  # allocator slack, CUDA context, LoRA + optimizer state
    if usable <= 0:
        raise RuntimeError(
            f"memory budget {budget_gib:.1f} GiB is below the model's 4-bit weights ({weights_gib:.2f} GiB) plus overhead"
        )

    def per_token(gc: bool) -> float:
        act = (2 if gc else 34) * hidden_size * num_layers
        return act + vocab_size * 10

    for gc in ([False, True] if gc_setting == "auto" else [gc_setting == "on"]):
        for micro in _divisors_desc(batch_size):
            need = micro * max_length * per_token(gc) / GIB
            if gc:  # one layer's full activations are recomputed at a time
                need += micro * max_length * 34 * hidden_size / GIB
            if need <= usable:
                tokens = settings.tokens_per_micro_batch or micro * max_length
                return MemoryPlan(
                    micro, batch_size // micro, gc, tokens, budget_gib,
                    f"est. {need + weights_gib:.2f} GiB of {budget_gib:.1f} GiB at micro-batch {micro}",
                )
    return MemoryPlan(
        1, batch_size, True, settings.tokens_per_micro_batch or max_length, budget_gib,
        "even micro-batch 1 is estimated above the budget; trying with checkpointing",
    )


def halve(plan: MemoryPlan) -> MemoryPlan | None:
    """The plan after an out-of-memory error: half the micro-batch, twice the accumulation (same effective
    batch). None when the micro-batch is already 1 and checkpointing is on."""
    if plan.micro_batch > 1:
        micro = plan.micro_batch // 2
        while plan.effective_batch % micro:
            micro -= 1
        tokens = max(64, plan.tokens_per_micro_batch // 2) if plan.tokens_per_micro_batch else None
        return MemoryPlan(micro, plan.effective_batch // micro, plan.gradient_checkpointing, tokens,
                          plan.budget_gib, f"halved after out-of-memory (was {plan.micro_batch})")
    if not plan.gradient_checkpointing:
        return MemoryPlan(1, plan.grad_accum, True, plan.tokens_per_micro_batch, plan.budget_gib,
                          "gradient checkpointing switched on after out-of-memory")
    return None


def last_checkpoint(ckpt_dir: Path) -> Path | None:
    from transformers.trainer_utils import get_last_checkpoint

    if not ckpt_dir.is_dir():
        return None
    last = get_last_checkpoint(str(ckpt_dir))
    return Path(last) if last else None


def _child_run(job: TrainJob, tracker, out_dir: Path) -> tuple[str, bool]:
    """The child run of this training: the one recorded in the output directory if the server still has it
    (resume), else a new one under the parent run."""
    state_path = out_dir / STATE_FILE
    if state_path.exists():
        state = json.loads(state_path.read_text())
        rid = state.get("run_id")
        if rid and tracker.run_status(rid) is not None:
            tracker.resume_run(rid)
            return rid, True
    rid = tracker.start_run(
        job.model_name,
        parent_id=job.parent_run_id,
        tags={"qabot.model": job.model_name, "qabot.arch": job.arch, "qabot.base_model": job.base_model,
              "qabot.stage": "train", **job.extra_tags},
    )
    write_json(state_path, {"run_id": rid, "tracking_uri": job.tracking_uri})
    return rid, False


def _peak_memory_bytes(device: str) -> int:
    if device == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # process high-water mark


def _training_arguments(job: TrainJob, plan: MemoryPlan, device: str, ckpt_dir: Path):
    import torch
    from transformers import TrainingArguments

    spec, ts = job.model_spec(), job.training_settings()
    bf16 = ts.bf16 and (device == "cpu" or torch.cuda.is_bf16_supported())
    return TrainingArguments(
        output_dir=str(ckpt_dir),
        num_train_epochs=spec.epochs,
        max_steps=spec.max_steps or -1,
        per_device_train_batch_size=plan.micro_batch,
        per_device_eval_batch_size=plan.micro_batch,
        gradient_accumulation_steps=plan.grad_accum,
        gradient_checkpointing=plan.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if plan.gradient_checkpointing else None,
        learning_rate=spec.learning_rate or ts.learning_rate,
        warmup_steps=ts.warmup_ratio,
        lr_scheduler_type=ts.lr_scheduler,
        weight_decay=ts.weight_decay,
        max_grad_norm=ts.max_grad_norm,
        optim=ts.optimizer,
        logging_steps=ts.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if (ts.eval_steps and job.eval_dataset) else ("epoch" if job.eval_dataset else "no"),
        eval_steps=ts.eval_steps,
        save_strategy="steps",
        save_steps=ts.save_steps,
        save_total_limit=2,
        seed=ts.seed,
        data_seed=ts.seed,
        bf16=bf16,
        use_cpu=device == "cpu",
        report_to=[],
        remove_unused_columns=False,
        dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,
        run_name=job.model_name,
    )


def _mlflow_callback(run_id: str, resumed: bool):
    """The Trainer's own MLflow callback, made safe for resumed runs: parameters are logged once, and steps
    already in the run (logged before a kill, after the last checkpoint) are not logged twice."""
    from mlflow import MlflowClient
    from transformers.integrations import MLflowCallback

    floor = -1
    if resumed:
        hist = MlflowClient().get_metric_history(run_id, "loss")
        floor = max((m.step for m in hist), default=-1)

    class ResumableMLflowCallback(MLflowCallback):
        def setup(self, args, state, model):
            params = MlflowClient().get_run(run_id).data.params
            if "per_device_train_batch_size" in params:  # already logged by an earlier attempt
                os.environ["MLFLOW_MAX_LOG_PARAMS"] = "0"
            try:
                super().setup(args, state, model)
            finally:
                os.environ.pop("MLFLOW_MAX_LOG_PARAMS", None)

        def on_log(self, args, state, control, logs, model=None, **kwargs):
            if state.global_step <= floor and "train_runtime" not in logs:
                return
            super().on_log(args, state, control, logs, model=model, **kwargs)

    return ResumableMLflowCallback()


def _simulated_oom_callback():
    """QABOT_SIMULATE_OOM=STEP:MICRO raises an out-of-memory error at STEP while the micro-batch is > MICRO."""
    spec = os.environ.get("QABOT_SIMULATE_OOM")
    if not spec:
        return None
    import torch
    from transformers import TrainerCallback

    step, micro = (int(x) for x in spec.split(":"))

    class SimulatedOom(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step >= step and args.per_device_train_batch_size > micro:
                raise torch.OutOfMemoryError(f"simulated CUDA out of memory at step {state.global_step}")

    return SimulatedOom()


def _kill_after_callback():
    """QABOT_KILL_AFTER_STEP=N ends the process abruptly after step N is checkpointed (tests of resume)."""
    spec = os.environ.get("QABOT_KILL_AFTER_STEP")
    if not spec:
        return None
    from transformers import TrainerCallback

    n = int(spec)

    class KillAfter(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= n:
                os._exit(137)

    return KillAfter()


def run_training(job: TrainJob) -> dict[str, Any]:
    """Fine-tune one model with QLoRA; return a JSON-able result (adapter path, child run id, metrics)."""
    import torch
    from datasets import load_from_disk
    from peft import get_peft_model

    from pipeline_lib import batching, modeling, tokenization

    out_dir = Path(job.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out_dir / "checkpoints"
    device = resolve_device(job.device)
    spec, ts = job.model_spec(), job.training_settings()
    quant = QuantizationConfig.model_validate(job.quantization)
    lora = LoraSettings.model_validate(job.lora)
    target = TrackingTarget(job.tracking_uri, job.experiment)
    tracker = make_tracker(target)
    run_id, resumed = _child_run(job, tracker, out_dir)
    events: list[dict] = []
    events_path = out_dir / "events.json"
    if events_path.exists():
        events = json.loads(events_path.read_text())
    if resumed:
        events.append({"event": "resumed", "time": time.time(), "checkpoint": str(last_checkpoint(ckpt_dir))})

    fluent = None
    if target.enabled:
        import mlflow

        mlflow.set_tracking_uri(target.uri)
        fluent = mlflow.start_run(run_id=run_id, log_system_metrics=job.system_metrics)
    status = "FAILED"
    try:
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            if ts.gpu_memory_gib:
                total = torch.cuda.get_device_properties(0).total_memory
                frac = min(1.0, ts.gpu_memory_gib * GIB / total)
                torch.cuda.set_per_process_memory_fraction(frac)
        use_fast = job.use_fast_tokenizer
        if use_fast is None:
            use_fast = modeling.recommended_use_fast(job.base_model)
        tokenizer = tokenization.load_tokenizer(job.base_path, use_fast=use_fast)
        train_ds = load_from_disk(job.train_dataset)
        eval_ds = load_from_disk(job.eval_dataset) if job.eval_dataset else None

        model = modeling.load_model(job.base_path, quant, device, for_training=False)
        qreport = modeling.quantization_report(model)
        modeling.check_quantized(qreport, job.model_name, expected=quant.load_in_4bit)
        treport = modeling.tokenizer_report(tokenizer, job.base_model, model.config)
        cfg = model.config
        budget = ts.gpu_memory_gib
        if device == "cuda" and budget is None:
            budget = torch.cuda.get_device_properties(0).total_memory / GIB
        plan = plan_memory(
            spec.batch_size, spec.max_length, ts, device=device, budget_gib=budget,
            weights_gib=qreport["footprint_bytes"] / GIB,
            hidden_size=getattr(cfg, "hidden_size", 1024),
            num_layers=getattr(cfg, "num_hidden_layers", getattr(cfg, "n_layer", 1)),
            vocab_size=getattr(cfg, "vocab_size", 32000),
        )
        del model

        targets: list[str] = []
        lreport: dict = {}
        initial: dict = {}
        result_metrics: dict[str, Any] = {}
        while True:
            model = modeling.load_model(job.base_path, quant, device, for_training=True,
                                        gradient_checkpointing=plan.gradient_checkpointing)
            targets = modeling.lora_target_modules(model) if lora.target_modules == "all-linear" else list(lora.target_modules)
            model = get_peft_model(model, modeling.lora_config(lora, targets, model))
            lreport = modeling.lora_report(model)
            resume_from = last_checkpoint(ckpt_dir)
            if not initial:
                initial = modeling.snapshot_lora(model)
            if not resumed and resume_from is None and not events:
                tracker.log_params(run_id, {
                    "base_model": job.base_model, "base_revision": job.base_revision or "local",
                    "base_fingerprint": job.base_fingerprint, "arch": job.arch, "device": device,
                    "dataset_fingerprint": job.data_fingerprint, "tokenized_fingerprint": job.tokenized_fingerprint,
                    "quant": quant.model_dump(), "lora": {**lora.model_dump(), "targets": targets},
                    "epochs": spec.epochs, "batch_size": spec.batch_size, "max_steps": spec.max_steps,
                    "max_length": spec.max_length, "peak_learning_rate": spec.learning_rate or ts.learning_rate,
                    "warmup_ratio": ts.warmup_ratio, "scheduler": ts.lr_scheduler,
                    "memory_plan": asdict(plan), "tokenizer_use_fast": use_fast,
                })
                tracker.log_metrics(run_id, {
                    "preflight.linear_layers": qreport["linear_layers"],
                    "preflight.linear_4bit": qreport["linear_4bit"],
                    "preflight.share_4bit": qreport["share_4bit"],
                    "preflight.footprint_gib": qreport["footprint_bytes"] / GIB,
                    "preflight.bf16_footprint_gib": qreport["bf16_footprint_bytes"] / GIB,
                    "preflight.trainable_params": lreport["trainable_params"],
                })
                tracker.log_dict(run_id, {"quantization": qreport, "tokenizer": treport, "lora": lreport,
                                          "memory_plan": asdict(plan)}, "preflight.json")
            args = _training_arguments(job, plan, device, ckpt_dir)
            callbacks = [c for c in (_simulated_oom_callback(), _kill_after_callback()) if c]
            if target.enabled:
                callbacks.insert(0, _mlflow_callback(run_id, resumed or resume_from is not None))
            trainer_kwargs = dict(
                model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                data_collator=batching.PadCollator(tokenizer.pad_token_id),
                callbacks=callbacks,
            )
            if ts.group_by_length:
                trainer = batching.BudgetTrainer(
                    **trainer_kwargs, tokens_per_batch=plan.tokens_per_micro_batch,
                    max_rows_per_batch=plan.micro_batch,
                )
            else:
                from transformers import Trainer

                trainer = Trainer(**trainer_kwargs)
            try:
                t0 = time.time()
                out = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
                result_metrics = dict(out.metrics)
                result_metrics["wall_time_s"] = time.time() - t0
                break
            except torch.OutOfMemoryError as err:
                new = halve(plan)
                events.append({"event": "out_of_memory", "time": time.time(), "step": trainer.state.global_step,
                               "message": str(err)[:300], "old_plan": asdict(plan),
                               "new_plan": asdict(new) if new else None})
                write_json(events_path, events)
                tracker.log_dict(run_id, events, "events.json")
                tracker.set_tags(run_id, {"qabot.oom_events": sum(e["event"] == "out_of_memory" for e in events)})
                del trainer, model
                import gc

                gc.collect()
                if device == "cuda":
                    torch.cuda.empty_cache()
                if new is None:
                    raise RuntimeError(f"{job.model_name}: out of memory even at micro-batch 1 with checkpointing") from None
                plan = new

        adapter_dir = out_dir / "adapter"
        model.save_pretrained(adapter_dir)
        tokenizer.save_pretrained(adapter_dir)
        areport = modeling.check_adapter(adapter_dir, initial)
        eval_metrics = trainer.evaluate() if eval_ds is not None else {}
        history = trainer.state.log_history
        losses = [h["loss"] for h in history if "loss" in h]
        n_tokens = int(result_metrics.get("num_input_tokens_seen", trainer.state.num_input_tokens_seen))
        runtime = float(result_metrics.get("train_runtime", result_metrics["wall_time_s"]))
        peak = _peak_memory_bytes(device)
        lengths = list(train_ds["length"]) if "length" in train_ds.column_names else []
        pad_share = batching.expected_padding_share(lengths, plan.micro_batch, plan.tokens_per_micro_batch,
                                                    ts.group_by_length, ts.seed) if lengths else None
        metrics = {
            "train_loss": float(result_metrics.get("train_loss", losses[-1] if losses else math.nan)),
            "final_loss": float(losses[-1]) if losses else math.nan,
            "eval_loss": float(eval_metrics.get("eval_loss", math.nan)),
            "train_runtime_s": runtime,
            "train_tokens": n_tokens,
            "real_tokens_per_s": n_tokens / runtime if runtime > 0 else 0.0,
            "steps": int(trainer.state.global_step),
            "peak_memory_gib": peak / GIB,
            "padding_share": pad_share if pad_share is not None else math.nan,
            "oom_events": sum(e["event"] == "out_of_memory" for e in events),
        }
        tracker.log_metrics(run_id, {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                            step=int(trainer.state.global_step))
        tracker.set_tags(run_id, {"qabot.peak_memory_kind": "cuda_allocated" if device == "cuda" else "process_rss"})
        write_json(out_dir / "log_history.json", history)
        tracker.log_artifact(run_id, out_dir / "log_history.json")
        tracker.log_artifact(run_id, adapter_dir, "adapter")
        if events:
            write_json(events_path, events)
            tracker.log_dict(run_id, events, "events.json")
        from pipeline_lib.tiny import directory_fingerprint

        result = {
            "model_name": job.model_name, "adapter_dir": str(adapter_dir), "run_id": run_id,
            "adapter_fingerprint": directory_fingerprint(adapter_dir),
            "base_path": job.base_path, "arch": job.arch, "device": device, "metrics": metrics,
            "memory_plan": asdict(plan), "lora_targets": targets, "adapter_check": areport,
            "quantization": qreport, "resumed": resumed, "events": events,
        }
        write_json(out_dir / RESULT_FILE, result)
        status = "FINISHED"
        return result
    finally:
        if fluent is not None:
            import mlflow

            mlflow.end_run(status=status)
        elif target.enabled:
            tracker.end_run(run_id, status)


def train_stage(job: dict) -> dict[str, Any]:
    """Entry point for `pipeline_lib.isolation.call` (plain data in, plain data out)."""
    return run_training(TrainJob(**job))
