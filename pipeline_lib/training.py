"""QLoRA fine-tuning of one model: pre-flight, memory plan, the transformers Trainer, faults, resume.

`run_training(job)` is the whole stage for one model. It is written to run in its own process (see
`pipeline_lib.isolation`) so that every byte of GPU memory is released before the next model starts.

Flow of one call:

1. pre-flight: the base is loaded once as for inference; 4-bit layers, tokenizer and LoRA targets are checked
   (`pipeline_lib.modeling`), and the model's sizes feed `plan_memory`, which splits each optimizer step of
   `batch_size` rows into micro-batches (and turns gradient checkpointing on) to fit the GPU memory budget;
2. training with the Trainer, checkpointing every `save_steps` (adapter, optimizer, scheduler, RNG);
3. an out-of-memory error halves the micro-batch (`halve`: accumulation doubles, the effective batch and the
   total step count stay), is recorded as an `out_of_memory` event, and training goes on from the last
   checkpoint;
4. the adapter is saved and checked, evaluated, and everything is logged to one MLflow child run.

Restarts: the child run's id, the current memory plan and the step total are kept in `out_dir/run_state.json`.
A rerun after a kill continues the same run from the last complete checkpoint, and the Trainer's MLflow
callback skips the steps that were already logged before the kill, so no step is logged twice. A rerun after a
finished training returns the stored result.

Test hooks (environment): `QABOT_SIMULATE_OOM=STEP:MICRO` raises an out-of-memory error from step STEP on while
the micro-batch is larger than MICRO; `QABOT_KILL_AFTER_STEP=N` ends the process abruptly once step N is logged.
"""

from __future__ import annotations

import gc
import json
import math
import os
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline_lib.config import LoraSettings, ModelSpec, QuantizationConfig, TrainingSettings
from pipeline_lib.tracking import TrackingTarget, make_tracker, write_json

STATE_FILE = "run_state.json"
RESULT_FILE = "train_result.json"
EVENTS_FILE = "events.json"
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
    system_metrics_interval_s: float | None = None  # None = MLflow's default
    use_fast_tokenizer: bool | None = None
    extra_tags: dict = field(default_factory=dict)
    # Length statistics of the tokenized training split: flat (mean, p99, rows, truncated, dropped, ...) or as
    # `tokenize_split` returns them (length_stats, n_rows, n_truncated, ...); empty = read from the split's directory.
    token_stats: dict = field(default_factory=dict)

    def model_spec(self) -> ModelSpec:
        return ModelSpec.model_validate(self.spec)

    def training_settings(self) -> TrainingSettings:
        return TrainingSettings.model_validate(self.training)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device is 'cuda' but no CUDA GPU is visible (set device: cpu or auto)")
    return device


# ----------------------------------------------------------------------------------------------------------
# Memory plan
# ----------------------------------------------------------------------------------------------------------


@dataclass
class MemoryPlan:
    """How one optimizer step of `batch_size` rows is split to fit the memory budget."""

    micro_batch: int
    grad_accum: int
    gradient_checkpointing: bool
    tokens_per_micro_batch: int | None  # micro-batch rows x max_length: its worst case in tokens
    budget_gib: float | None
    reason: str
    estimate_gib: float | None = None  # estimated peak GPU memory (None on the CPU)

    @property
    def effective_batch(self) -> int:
        return self.micro_batch * self.grad_accum


# Bytes of the estimate (QLoRA with bf16 autocast, after peft's `prepare_model_for_kbit_training`, which keeps
# every non-quantized parameter, and with it the residual stream, in float32), per token:
# - ACTIVATION_BYTES x hidden per layer, saved for backward: fp32 norms and residual, the bf16 cast of each
#   linear layer's input, LoRA dropout copies and masks, attention and gated-MLP intermediates;
# - CHECKPOINT_BYTES x hidden per layer with gradient checkpointing: only each layer's fp32 input;
# - EAGER_SCORE_BYTES x heads x sequence length per layer, eager attention only (bf16 scores, fp32 softmax,
#   bf16 probabilities); sdpa and flash attention keep no scores;
# - LOGIT_BYTES x vocabulary: transformers 5 computes logits at every position (`logits_to_keep=0`, which the
#   Trainer leaves as it is), and the loss holds bf16 logits, their fp32 upcast, the log-softmax, its fp32
#   gradient and the bf16 gradient;
# plus LORA_STATE_BYTES per trainable parameter (fp32 weight, gradient, two Adam moments).
ACTIVATION_BYTES = 128
CHECKPOINT_BYTES = 4
EAGER_SCORE_BYTES = 10
LOGIT_BYTES = 14
LORA_STATE_BYTES = 16
BUDGET_HEADROOM = 0.9  # share of the budget the estimate may use (allocator fragmentation, cuBLAS workspace)


def estimate_peak_gib(
    micro_batch: int,
    seq_len: int,
    gradient_checkpointing: bool,
    *,
    weights_gib: float,
    hidden_size: int,
    num_layers: int,
    vocab_size: int,
    num_heads: int | None = None,
    eager_attention: bool = False,
    upcast_gib: float | None = None,
    trainable_params: int | None = None,
) -> float:
    """Estimated peak GPU memory (GiB, as `torch.cuda.max_memory_allocated` counts it) of one training step
    of `micro_batch` rows of `seq_len` tokens.

    static = 4-bit weights + `upcast_gib` (the non-quantized parameters' second copy in float32; default: one
    embedding matrix) + LoRA weights, gradients and Adam state (default: 20·16·hidden per layer, LoRA r=16 on
    every linear layer). Without checkpointing every layer's activations are alive when the logits are
    computed: static + layers x activations + logits. With checkpointing only the layer inputs are kept, and
    the peak is either the loss (logits) or one layer recomputed in the backward pass, whichever is larger.

    Checked against the device notes' measurements (rows of up to 512 tokens, padded, checkpointing):
    llama-3b 4 rows: estimate 4.1 GiB, measured 4.25 GiB under an 8 GiB cap; llama-3b 16 rows: estimate
    8.6 GiB, measured 8.4 GiB uncapped and out of memory under 8 GiB; bloom-3b 2 rows (eager attention):
    estimate 7.4 GiB, out of memory under 8 GiB at a 7.43 GiB peak. The logits dominate for a 250k vocabulary
    (bloom: 3.4 GiB of the 7.4 for 1,024 tokens).
    """
    heads = num_heads or max(1, hidden_size // 64)
    upcast = vocab_size * hidden_size * 2 / GIB if upcast_gib is None else upcast_gib
    trainable = 20 * 16 * hidden_size * num_layers if trainable_params is None else trainable_params
    static = weights_gib + upcast + trainable * LORA_STATE_BYTES / GIB
    tokens = micro_batch * seq_len
    layer = hidden_size * ACTIVATION_BYTES + (heads * seq_len * EAGER_SCORE_BYTES if eager_attention else 0)
    logits = tokens * vocab_size * LOGIT_BYTES
    if gradient_checkpointing:
        kept = tokens * num_layers * hidden_size * CHECKPOINT_BYTES
        dynamic = kept + max(logits, tokens * layer)
    else:
        dynamic = tokens * num_layers * layer + logits
    return static + dynamic / GIB


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
    num_heads: int | None = None,
    eager_attention: bool = False,
    upcast_gib: float | None = None,
    trainable_params: int | None = None,
) -> MemoryPlan:
    """Choose micro-batch, accumulation and gradient checkpointing so one step keeps `batch_size` rows
    and the estimated peak (`estimate_peak_gib`, rows of `max_length` tokens) stays under
    `BUDGET_HEADROOM` x `budget_gib`. On the CPU (or without a budget) the whole batch is one micro-batch.

    Preference: no checkpointing with the largest micro-batch that fits, else checkpointing with the largest
    micro-batch that fits (`settings.gradient_checkpointing` 'on'/'off' restricts the choice). When nothing
    fits, micro-batch 1 (with checkpointing unless it is 'off') is returned for `halve` to take over.
    """
    gc_setting = settings.gradient_checkpointing
    cap = settings.tokens_per_micro_batch
    micros = [d for d in _divisors_desc(batch_size) if cap is None or d * max_length <= cap] or [1]
    if device != "cuda" or budget_gib is None:
        micro = micros[0]
        reason = "no GPU memory budget" + (f"; micro-batch capped at {cap} tokens" if cap else "")
        return MemoryPlan(
            micro, batch_size // micro, gc_setting == "on", micro * max_length, budget_gib, reason
        )
    limit = budget_gib * BUDGET_HEADROOM

    def estimate(micro: int, gc: bool) -> float:
        return estimate_peak_gib(
            micro,
            max_length,
            gc,
            weights_gib=weights_gib,
            hidden_size=hidden_size,
            num_layers=num_layers,
            vocab_size=vocab_size,
            num_heads=num_heads,
            eager_attention=eager_attention,
            upcast_gib=upcast_gib,
            trainable_params=trainable_params,
        )

    options = {"auto": [False, True], "on": [True], "off": [False]}[gc_setting]
    for checkpointing in options:
        for micro in micros:
            need = estimate(micro, checkpointing)
            if need <= limit:
                return MemoryPlan(
                    micro,
                    batch_size // micro,
                    checkpointing,
                    micro * max_length,
                    budget_gib,
                    f"est. {need:.2f} GiB of {budget_gib:.1f} GiB at micro-batch {micro}"
                    + (" with gradient checkpointing" if checkpointing else ""),
                    round(need, 3),
                )
    checkpointing = gc_setting != "off"
    need = estimate(1, checkpointing)
    return MemoryPlan(
        1,
        batch_size,
        checkpointing,
        max_length,
        budget_gib,
        f"even micro-batch 1 is estimated at {need:.2f} GiB, above {limit:.2f} GiB of {budget_gib:.1f} GiB",
        round(need, 3),
    )


def halve(plan: MemoryPlan) -> MemoryPlan | None:
    """The plan after an out-of-memory error: half the micro-batch, twice the accumulation (same effective
    batch); at micro-batch 1, gradient checkpointing on. None when the micro-batch is already 1 and
    checkpointing is on."""
    if plan.micro_batch > 1:
        micro = plan.micro_batch // 2
        while plan.effective_batch % micro:
            micro -= 1
        tokens = (
            plan.tokens_per_micro_batch // plan.micro_batch * micro if plan.tokens_per_micro_batch else None
        )
        return MemoryPlan(
            micro,
            plan.effective_batch // micro,
            plan.gradient_checkpointing,
            tokens,
            plan.budget_gib,
            f"halved after out-of-memory (was {plan.micro_batch})",
        )
    if not plan.gradient_checkpointing:
        return MemoryPlan(
            1,
            plan.grad_accum,
            True,
            plan.tokens_per_micro_batch,
            plan.budget_gib,
            "gradient checkpointing switched on after out-of-memory",
        )
    return None


# ----------------------------------------------------------------------------------------------------------
# Checkpoints and the state kept in the output directory
# ----------------------------------------------------------------------------------------------------------


def _checkpoint_step(path: Path) -> int:
    try:
        return int(path.name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def last_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint: the Trainer writes `trainer_state.json` last, so a checkpoint cut off
    by a kill in the middle of saving (no readable state) is passed over."""
    if not ckpt_dir.is_dir():
        return None
    found = [p for p in ckpt_dir.glob("checkpoint-*") if p.is_dir() and _checkpoint_step(p) >= 0]
    for path in sorted(found, key=_checkpoint_step, reverse=True):
        try:
            json.loads((path / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        return path
    return None


def _read_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


def _update_state(out_dir: Path, **changes: Any) -> dict:
    state = {**_read_json(out_dir / STATE_FILE, {}), **changes}
    write_json(out_dir / STATE_FILE, state)
    return state


def _stored_result(job: TrainJob, tracker, out_dir: Path) -> dict | None:
    """The result of a training that already finished in `out_dir` (same inputs), else None."""
    result = _read_json(out_dir / RESULT_FILE, None)
    if not result or not Path(result.get("adapter_dir", "")).is_dir():
        return None
    if job.tracking_uri and tracker.run_status(result.get("run_id", "")) != "FINISHED":
        return None
    return result


def _child_run(job: TrainJob, tracker, out_dir: Path) -> tuple[str, bool]:
    """(run id, continued): the child run recorded in the output directory if the server still has it
    (a rerun after a kill or a failure), else a new one under the parent run."""
    state = _read_json(out_dir / STATE_FILE, {})
    rid = state.get("run_id")
    if rid and state.get("tracking_uri") == job.tracking_uri and tracker.run_status(rid) is not None:
        tracker.resume_run(rid)
        return rid, True
    rid = tracker.start_run(
        job.model_name,
        parent_id=job.parent_run_id,
        tags={
            "qabot.model": job.model_name,
            "qabot.arch": job.arch,
            "qabot.base_model": job.base_model,
            "qabot.stage": "train",
            **job.extra_tags,
        },
    )
    _update_state(out_dir, run_id=rid, tracking_uri=job.tracking_uri)
    return rid, False


def _peak_memory_bytes(device: str) -> int:
    if device == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # process high-water mark


def _token_stats(job: TrainJob) -> dict:
    """Length statistics of the tokenized training split: from the job, else from the split's directory."""
    if job.token_stats:
        return job.token_stats
    from pipeline_lib.tokenization import STATS_FILE

    return _read_json(Path(job.train_dataset) / STATS_FILE, {})


_TOKEN_METRICS = {  # key in the statistics -> metric name (tokens.NAME)
    **{k: k for k in ("mean", "median", "p90", "p99", "max", "rows", "truncated", "dropped", "label_tokens")},
    "n_rows": "rows",
    "n_truncated": "truncated",
    "n_dropped": "dropped",
    "padding_free_tokens": "total",
}


def _token_metrics(stats: dict) -> dict[str, float]:
    """`tokens.mean`, `tokens.p99`, `tokens.truncated`, ... of either form of the length statistics."""
    flat = {**(stats.get("length_stats") or {}), **stats}
    out = {
        f"tokens.{name}": float(flat[key])
        for key, name in _TOKEN_METRICS.items()
        if isinstance(flat.get(key), (int, float)) and not isinstance(flat.get(key), bool)
    }
    if out.get("tokens.rows"):
        out["tokens.truncated_share"] = out.get("tokens.truncated", 0.0) / out["tokens.rows"]
    return out


# ----------------------------------------------------------------------------------------------------------
# Trainer pieces
# ----------------------------------------------------------------------------------------------------------


def _training_arguments(
    job: TrainJob, plan: MemoryPlan, device: str, ckpt_dir: Path, max_steps: int | None, eval_on_start: bool
):
    import torch
    from transformers import TrainingArguments

    spec, ts = job.model_spec(), job.training_settings()
    bf16 = ts.bf16 and (device == "cpu" or torch.cuda.is_bf16_supported())
    has_eval = job.eval_dataset is not None
    return TrainingArguments(
        output_dir=str(ckpt_dir),
        num_train_epochs=spec.epochs,
        max_steps=max_steps or spec.max_steps or -1,
        per_device_train_batch_size=plan.micro_batch,
        per_device_eval_batch_size=plan.micro_batch,
        gradient_accumulation_steps=plan.grad_accum,
        gradient_checkpointing=plan.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if plan.gradient_checkpointing else None,
        learning_rate=spec.learning_rate or ts.learning_rate,
        warmup_steps=ts.warmup_ratio,  # transformers 5: a value below 1 is a share of the total steps
        lr_scheduler_type=ts.lr_scheduler,
        weight_decay=ts.weight_decay,
        max_grad_norm=ts.max_grad_norm,
        optim=ts.optimizer,
        logging_steps=ts.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if (ts.eval_steps and has_eval) else ("epoch" if has_eval else "no"),
        eval_steps=ts.eval_steps,
        eval_on_start=eval_on_start and has_eval,
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


def _logged_floor(tracking_uri: str, run_id: str) -> int:
    """The last step the Trainer logged to the run (`loss` or `eval_loss`); -1 when none."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    steps = [m.step for key in ("loss", "eval_loss") for m in client.get_metric_history(run_id, key)]
    return max(steps, default=-1)


def _mlflow_callback(tracking_uri: str, run_id: str):
    """The Trainer's own MLflow callback, made safe for continued runs: logging is synchronous (a kill loses
    nothing already reported), parameters already in the run are not logged again (a changed value would be
    refused), and steps the run already has (logged before a kill or an out-of-memory error, after the last
    checkpoint, and now trained again) are not logged twice."""
    from mlflow.entities import Param
    from transformers.integrations import MLflowCallback

    from mlflow import MlflowClient

    floor = _logged_floor(tracking_uri, run_id)

    class ResumableMLflowCallback(MLflowCallback):
        def setup(self, args, state, model):
            previous = os.environ.get("MLFLOW_MAX_LOG_PARAMS")
            os.environ["MLFLOW_MAX_LOG_PARAMS"] = "0"  # the parameters are logged below
            try:
                super().setup(args, state, model)
            finally:
                if previous is None:
                    os.environ.pop("MLFLOW_MAX_LOG_PARAMS", None)
                else:
                    os.environ["MLFLOW_MAX_LOG_PARAMS"] = previous
            self._async_log = False
            client = MlflowClient(tracking_uri)
            existing = client.get_run(run_id).data.params
            config = getattr(model, "config", None)
            combined = {**(config.to_dict() if config is not None else {}), **args.to_dict()}
            items = [
                Param(k, str(v))
                for k, v in combined.items()
                if k not in existing and len(str(v)) <= self._MAX_PARAM_VAL_LENGTH
            ]
            for i in range(0, len(items), 100):
                client.log_batch(run_id, params=items[i : i + 100])

        def on_log(self, args, state, control, logs, model=None, **kwargs):
            if state.global_step <= floor:
                return
            # The summary's train_loss covers this call's steps only; run_training logs the whole run's.
            logs = {k: v for k, v in logs.items() if k != "train_loss"}
            super().on_log(args, state, control, logs, model=model, **kwargs)

    return ResumableMLflowCallback()


def _simulated_oom_callback():
    """QABOT_SIMULATE_OOM=STEP:MICRO raises an out-of-memory error from STEP on while the micro-batch is > MICRO."""
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
    """QABOT_KILL_AFTER_STEP=N ends the process abruptly (no cleanup, exit code 137) once step N is logged."""
    spec = os.environ.get("QABOT_KILL_AFTER_STEP")
    if not spec:
        return None
    from transformers import TrainerCallback

    n = int(spec)

    class KillAfter(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.global_step >= n and logs and "loss" in logs:
                os._exit(137)

    return KillAfter()


def _is_out_of_memory(err: BaseException) -> bool:
    import torch

    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def _free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# ----------------------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _Context:
    """What the steps of one training share."""

    job: TrainJob
    device: str
    out_dir: Path
    ckpt_dir: Path
    run_id: str
    tracker: Any
    target: TrackingTarget
    quant: QuantizationConfig
    lora: LoraSettings
    events: list[dict]
    extra_callbacks: list = field(default_factory=list)

    def record(self, event: dict) -> None:
        self.events.append({"time": time.time(), **event})
        write_json(self.out_dir / EVENTS_FILE, self.events)
        self.tracker.log_dict(self.run_id, self.events, EVENTS_FILE)
        n_oom = sum(e["event"] == "out_of_memory" for e in self.events)
        self.tracker.set_tags(self.run_id, {"qabot.oom_events": n_oom, "qabot.last_event": event["event"]})


def _model_dims(model, quantized: bool) -> dict[str, Any]:
    """The sizes `plan_memory` needs, read from a loaded (pre-flight) model."""
    import torch

    cfg = model.config
    upcast = 0
    if quantized:  # prepare_model_for_kbit_training keeps a float32 copy of every 16-bit parameter
        upcast = sum(
            p.numel() * (4 - p.element_size())
            for p in model.parameters()
            if p.dtype in (torch.bfloat16, torch.float16)
        )
    return {
        "hidden_size": int(getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 1024)),
        "num_layers": int(getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", 1)),
        "vocab_size": int(getattr(cfg, "vocab_size", 32000)),
        "num_heads": int(getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", 0)) or None,
        "eager_attention": getattr(cfg, "_attn_implementation", "eager") == "eager",
        "upcast_gib": upcast / GIB,
    }


def _preflight(ctx: _Context, tokenizer) -> dict[str, Any]:
    """Load the base once as for inference: 4-bit, tokenizer and LoRA checks, and the model's sizes."""
    from peft import get_peft_model

    from pipeline_lib import modeling

    job = ctx.job
    model = modeling.load_model(job.base_path, ctx.quant, ctx.device, for_training=False)
    qreport = modeling.quantization_report(model)
    modeling.check_quantized(qreport, job.model_name, expected=ctx.quant.load_in_4bit)
    treport = modeling.tokenizer_report(tokenizer, job.base_model, model.config)
    dims = _model_dims(model, ctx.quant.load_in_4bit)
    targets = modeling.resolve_lora_targets(model, ctx.lora, job.model_name)
    model = get_peft_model(model, modeling.lora_config(ctx.lora, targets, model, job.model_name))
    lreport = modeling.lora_report(model, job.model_name)
    del model
    _free_memory(ctx.device)
    return {"quantization": qreport, "tokenizer": treport, "lora": lreport, "targets": targets, "dims": dims}


def _initial_plan(ctx: _Context, pre: dict) -> MemoryPlan:
    import torch

    spec, ts = ctx.job.model_spec(), ctx.job.training_settings()
    budget = ts.gpu_memory_gib
    if ctx.device == "cuda" and budget is None:
        budget = torch.cuda.get_device_properties(0).total_memory / GIB
    return plan_memory(
        spec.batch_size,
        spec.max_length,
        ts,
        device=ctx.device,
        budget_gib=budget,
        weights_gib=pre["quantization"]["footprint_bytes"] / GIB,
        trainable_params=pre["lora"]["trainable_params"],
        **pre["dims"],
    )


def _log_start(ctx: _Context, pre: dict, plan: MemoryPlan, use_fast: bool | None) -> None:
    """The run's parameters; only those it lacks are logged, so a continued run keeps its first values."""
    job, spec, ts = ctx.job, ctx.job.model_spec(), ctx.job.training_settings()
    params = {
        "base_model": job.base_model,
        "base_revision": job.base_revision or "local",
        "base_fingerprint": job.base_fingerprint,
        "arch": job.arch,
        "device": ctx.device,
        "dataset_fingerprint": job.data_fingerprint,
        "tokenized_fingerprint": job.tokenized_fingerprint,
        "quant": ctx.quant.model_dump(),
        "lora": {**ctx.lora.model_dump(), "targets": pre["targets"]},
        "epochs": spec.epochs,
        "batch_size": spec.batch_size,
        "max_length": spec.max_length,
        "peak_learning_rate": spec.learning_rate or ts.learning_rate,
        "warmup_ratio": ts.warmup_ratio,
        "scheduler": ts.lr_scheduler,
        "memory_plan": asdict(plan),
        "tokenizer_use_fast": use_fast,
    }
    if spec.max_steps:  # without it the Trainer logs its own max_steps (-1)
        params["max_steps"] = spec.max_steps
    ctx.tracker.log_params(ctx.run_id, params)


def _log_preflight(ctx: _Context, pre: dict, plan: MemoryPlan) -> None:
    q, lr = pre["quantization"], pre["lora"]
    metrics = {
        "preflight.linear_layers": q["linear_layers"],
        "preflight.linear_4bit": q["linear_4bit"],
        "preflight.share_4bit": q["share_4bit"],
        "preflight.footprint_gib": q["footprint_bytes"] / GIB,
        "preflight.bf16_footprint_gib": q["bf16_footprint_bytes"] / GIB,
        "preflight.trainable_params": lr["trainable_params"],
        **_token_metrics(_token_stats(ctx.job)),
    }
    ctx.tracker.log_metrics(ctx.run_id, metrics)
    ctx.tracker.log_dict(
        ctx.run_id,
        {
            "quantization": q,
            "tokenizer": pre["tokenizer"],
            "lora": lr,
            "dims": pre["dims"],
            "memory_plan": asdict(plan),
        },
        "preflight.json",
    )


def _log_plan(ctx: _Context, plan: MemoryPlan, step: int) -> None:
    metrics = {
        "memory.micro_batch": plan.micro_batch,
        "memory.grad_accum": plan.grad_accum,
        "memory.gradient_checkpointing": int(plan.gradient_checkpointing),
    }
    if plan.estimate_gib is not None:
        metrics["memory.estimate_gib"] = plan.estimate_gib
    ctx.tracker.log_metrics(ctx.run_id, metrics, step=step)


def _build_trainer(
    ctx: _Context, plan: MemoryPlan, data: dict, max_steps: int | None, resume_from: Path | None
):
    """A fresh model (4-bit base + LoRA, same initialisation every time) and its Trainer for `plan`."""
    from peft import get_peft_model
    from transformers import set_seed

    from pipeline_lib import batching, modeling

    job, ts = ctx.job, ctx.job.training_settings()
    model = modeling.load_model(
        job.base_path,
        ctx.quant,
        ctx.device,
        for_training=True,
        gradient_checkpointing=plan.gradient_checkpointing,
    )
    targets = modeling.resolve_lora_targets(model, ctx.lora, job.model_name)
    set_seed(ts.seed)
    model = get_peft_model(model, modeling.lora_config(ctx.lora, targets, model, job.model_name))
    args = _training_arguments(
        job, plan, ctx.device, ctx.ckpt_dir, max_steps, eval_on_start=resume_from is None
    )
    callbacks = [c for c in (_simulated_oom_callback(), _kill_after_callback()) if c]
    if ctx.target.enabled:
        callbacks.insert(0, _mlflow_callback(ctx.target.uri, ctx.run_id))
    callbacks += ctx.extra_callbacks
    spec = job.model_spec()
    trainer = batching.QabotTrainer(
        model=model,
        args=args,
        train_dataset=data["train"],
        eval_dataset=data["eval"],
        data_collator=batching.PadCollator(data["tokenizer"].pad_token_id),
        callbacks=callbacks,
        batch_size=spec.batch_size,
        group_by_length=ts.group_by_length,
        eval_tokens_per_batch=plan.tokens_per_micro_batch or plan.micro_batch * spec.max_length,
    )
    return model, trainer, targets


def _train(ctx: _Context, plan: MemoryPlan, data: dict, max_steps: int | None) -> dict[str, Any]:
    """Train to the end; after an out-of-memory error go on from the last checkpoint with `halve(plan)`."""

    from pipeline_lib import modeling

    initial: dict = {}
    steps_run = 0  # optimizer steps run by this call, steps redone after an out-of-memory error included
    while True:
        resume_from = last_checkpoint(ctx.ckpt_dir)
        start_step = _checkpoint_step(resume_from) if resume_from else 0
        model, trainer, targets = _build_trainer(ctx, plan, data, max_steps, resume_from)
        if not initial:
            initial = modeling.snapshot_lora(model)
        _log_plan(ctx, plan, start_step)
        oom: dict | None = None
        t0 = time.time()
        try:
            out = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        except RuntimeError as err:  # torch.OutOfMemoryError, or a kernel's own out-of-memory error
            if not _is_out_of_memory(err):
                raise
            oom = {"step": int(trainer.state.global_step), "message": " ".join(str(err).split())[:300]}
            max_steps = max_steps or int(trainer.state.max_steps) or None
        steps_run += int(trainer.state.global_step) - start_step
        if oom is None:
            return {
                "model": model,
                "trainer": trainer,
                "plan": plan,
                "targets": targets,
                "initial": initial,
                "train_metrics": {**out.metrics, "wall_time_s": time.time() - t0},
                "start_step": start_step,
                "steps_run": steps_run,
            }
        # Outside the `except` block, so the traceback no longer holds the failed step's tensors.
        new = halve(plan)
        ctx.record(
            {
                "event": "out_of_memory",
                **oom,
                "resume_from": str(last_checkpoint(ctx.ckpt_dir)),
                "old_plan": asdict(plan),
                "new_plan": asdict(new) if new else None,
            }
        )
        trainer.accelerator.free_memory()
        del trainer, model
        _free_memory(ctx.device)
        if new is None:
            raise RuntimeError(
                f"{ctx.job.model_name}: out of memory even at micro-batch 1 with gradient checkpointing"
            )
        plan = new
        # A rerun after a kill goes on with this plan and the same step total (and so the same LR schedule).
        _update_state(ctx.out_dir, plan=asdict(plan), max_steps=max_steps)


def _evaluate(trainer, data: dict) -> dict:
    """Final held-out metrics; the evaluation at the last step is reused when there is one."""
    if data["eval"] is None:
        return {}
    step = trainer.state.global_step
    for h in reversed(trainer.state.log_history):
        if "eval_loss" in h and h.get("step") == step:
            return h
    return trainer.evaluate()


def _finish(ctx: _Context, pre: dict, done: dict, data: dict, resumed_from: int | None) -> dict[str, Any]:
    """Save and check the adapter, evaluate, log the summary metrics and artifacts; the stage's result."""
    from pipeline_lib import batching, modeling
    from pipeline_lib.tiny import directory_fingerprint

    job, ts = ctx.job, ctx.job.training_settings()
    trainer, model, plan = done["trainer"], done["model"], done["plan"]
    adapter_dir = ctx.out_dir / "adapter"
    model.save_pretrained(adapter_dir)
    data["tokenizer"].save_pretrained(adapter_dir)
    areport = modeling.check_adapter(adapter_dir, done["initial"], job.model_name)
    eval_metrics = _evaluate(trainer, data)
    history = trainer.state.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    tm = done["train_metrics"]
    if "train_loss" in tm and done["start_step"] == 0:
        train_loss = float(tm["train_loss"])
    else:  # the Trainer's figure covers the last attempt's steps only
        train_loss = float(statistics.fmean(losses)) if losses else math.nan
    n_tokens = int(trainer.state.num_input_tokens_seen)
    runtime = float(tm.get("train_runtime", tm["wall_time_s"]))
    this_call_tokens = n_tokens - int(getattr(trainer, "_initial_num_input_tokens_seen", 0) or 0)
    lengths = list(data["train"]["length"]) if "length" in data["train"].column_names else []
    pad_share = (
        batching.expected_padding_share(
            lengths, plan.effective_batch, plan.micro_batch, ts.group_by_length, ts.seed
        )
        if lengths
        else None
    )
    metrics = {
        "train_loss": train_loss,
        "final_loss": float(losses[-1]) if losses else math.nan,
        "eval_loss": float(eval_metrics.get("eval_loss", math.nan)),
        "eval_perplexity": float(eval_metrics.get("eval_perplexity", math.nan)),
        "eval_bits_per_byte": float(eval_metrics.get("eval_bits_per_byte", math.nan)),
        "initial_eval_loss": float(evals[0]) if len(evals) > 1 else math.nan,
        "train_runtime_s": runtime,
        "train_tokens": n_tokens,
        "real_tokens_per_s": this_call_tokens / runtime if runtime > 0 else 0.0,
        "steps": int(trainer.state.global_step),
        "steps_run": done["steps_run"],
        "peak_memory_gib": _peak_memory_bytes(ctx.device) / GIB,
        "padding_share": pad_share if pad_share is not None else math.nan,
        "oom_events": sum(e["event"] == "out_of_memory" for e in ctx.events),
    }
    summary = {
        k: v
        for k, v in metrics.items()
        if not k.startswith("eval_")
        and not (isinstance(v, float) and math.isnan(v))  # the Trainer logs eval_*
    }
    ctx.tracker.log_metrics(ctx.run_id, summary, step=int(trainer.state.global_step))
    ctx.tracker.set_tags(
        ctx.run_id, {"qabot.peak_memory_kind": "cuda_allocated" if ctx.device == "cuda" else "process_rss"}
    )
    write_json(ctx.out_dir / "log_history.json", history)
    ctx.tracker.log_artifact(ctx.run_id, ctx.out_dir / "log_history.json")
    ctx.tracker.log_artifact(ctx.run_id, adapter_dir, "adapter")
    if ctx.events:
        write_json(ctx.out_dir / EVENTS_FILE, ctx.events)
        ctx.tracker.log_dict(ctx.run_id, ctx.events, EVENTS_FILE)
    return {
        "model_name": job.model_name,
        "adapter_dir": str(adapter_dir),
        "run_id": ctx.run_id,
        "adapter_fingerprint": directory_fingerprint(adapter_dir),
        "base_path": job.base_path,
        "arch": job.arch,
        "device": ctx.device,
        "metrics": metrics,
        "memory_plan": asdict(plan),
        "lora_targets": done["targets"],
        "adapter_check": areport,
        "quantization": pre["quantization"],
        "resumed": resumed_from is not None,
        "resumed_from_step": resumed_from or 0,
        "events": ctx.events,
    }


def run_training(job: TrainJob, callbacks: list | None = None) -> dict[str, Any]:
    """Fine-tune one model with QLoRA; return a JSON-able result (adapter path, child run id, metrics).

    `callbacks`: extra `TrainerCallback`s (in-process callers only, e.g. tests that observe each step)."""
    import torch
    from datasets import load_from_disk

    from pipeline_lib import modeling, tokenization

    out_dir = Path(job.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(job.device)
    ts = job.training_settings()
    target = TrackingTarget(job.tracking_uri, job.experiment)
    tracker = make_tracker(target)
    stored = _stored_result(job, tracker, out_dir)
    if stored is not None:
        return stored
    run_id, resumed = _child_run(job, tracker, out_dir)
    ctx = _Context(
        job=job,
        device=device,
        out_dir=out_dir,
        ckpt_dir=out_dir / "checkpoints",
        run_id=run_id,
        tracker=tracker,
        target=target,
        quant=QuantizationConfig.model_validate(job.quantization),
        lora=LoraSettings.model_validate(job.lora),
        events=_read_json(out_dir / EVENTS_FILE, []),
        extra_callbacks=list(callbacks or []),
    )
    ckpt = last_checkpoint(ctx.ckpt_dir)
    resumed_from = _checkpoint_step(ckpt) if ckpt else (0 if resumed else None)
    if resumed_from is not None:
        ctx.record({"event": "resumed", "checkpoint": str(ckpt) if ckpt else None, "step": resumed_from})

    fluent = None
    if target.enabled:
        import mlflow

        mlflow.set_tracking_uri(target.uri)
        if job.system_metrics and job.system_metrics_interval_s:
            mlflow.set_system_metrics_sampling_interval(job.system_metrics_interval_s)
        fluent = mlflow.start_run(
            run_id=run_id, log_system_metrics=job.system_metrics, nested=mlflow.active_run() is not None
        )
    status = "FAILED"
    try:
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            if ts.gpu_memory_gib:
                total = torch.cuda.get_device_properties(0).total_memory
                torch.cuda.set_per_process_memory_fraction(min(1.0, ts.gpu_memory_gib * GIB / total))
        use_fast = job.use_fast_tokenizer
        if use_fast is None:
            use_fast = modeling.recommended_use_fast(job.base_model)
        tokenizer = tokenization.load_tokenizer(job.base_path, use_fast=use_fast)
        data = {
            "tokenizer": tokenizer,
            "train": load_from_disk(job.train_dataset),
            "eval": load_from_disk(job.eval_dataset) if job.eval_dataset else None,
        }
        pre = _preflight(ctx, tokenizer)
        plan = _initial_plan(ctx, pre)
        _log_start(ctx, pre, plan, use_fast)
        if not resumed:
            _log_preflight(ctx, pre, plan)
        state = _read_json(out_dir / STATE_FILE, {})
        if state.get("plan"):  # set after an out-of-memory error in an earlier attempt
            plan = MemoryPlan(**state["plan"])
        done = _train(ctx, plan, data, state.get("max_steps"))
        result = _finish(ctx, pre, done, data, resumed_from)
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
