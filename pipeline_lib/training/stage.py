"""The training stage: QLoRA fine-tuning of one model, `train_stage(job) -> TrainResult`.

It is written to run in a process of its own (`pipeline_lib.isolation`), so that every byte of GPU memory is
released before the next model starts. One call:

1. pre-flight: the base is loaded once as for inference; 4-bit layers, tokenizer and LoRA targets are checked
   (`pipeline_lib.modeling`), and the model's sizes feed the memory plan (`training.memory`), which splits
   each optimizer step of `batch_size` rows into micro-batches (and turns gradient checkpointing on) to fit
   the GPU memory budget;
2. training with `QabotTrainer`, checkpointing every `save_steps` (adapter, optimizer, scheduler, RNG);
3. an out-of-memory error halves the micro-batch (`memory.halve`: accumulation doubles, the effective batch,
   the rows of every step and the total step count stay), is recorded as an `out_of_memory` event, and
   training goes on from the last checkpoint;
4. the adapter is saved and checked, evaluated, and everything is logged to the model's MLflow child run.

Restarts (`training.state`): a rerun after a kill continues the same run from the last complete checkpoint,
and the Trainer's MLflow callback skips the steps that were already logged, so no step is logged twice. A
rerun after a finished training returns the stored result.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pipeline_lib import devices, modeling, tokenization
from pipeline_lib.contracts import TrainResult
from pipeline_lib.files import directory_lock
from pipeline_lib.tracking import make_tracker
from pipeline_lib.training import reporting, state
from pipeline_lib.training.job import TrainJob
from pipeline_lib.training.memory import MemoryPlan, halve
from pipeline_lib.training.trainer import Context, build_trainer, initial_plan, preflight


def _train(ctx: Context, plan: MemoryPlan, data: dict, max_steps: int | None) -> dict[str, Any]:
    """Train to the end; after an out-of-memory error go on from the last checkpoint with `halve(plan)`."""
    initial: dict = {}
    steps_run = 0  # optimizer steps run by this call, steps redone after an out-of-memory error included
    while True:
        resume_from = state.last_checkpoint(ctx.ckpt_dir)
        start_step = state.checkpoint_step(resume_from) if resume_from else 0
        model, trainer, targets = build_trainer(ctx, plan, data, max_steps, resume_from)
        if not initial:
            initial = modeling.snapshot_lora(model)
        reporting.log_plan(ctx, plan, start_step)
        oom: dict | None = None
        t0 = time.time()
        try:
            out = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        except RuntimeError as err:  # torch.OutOfMemoryError, or a kernel's own out-of-memory error
            if not devices.is_out_of_memory(err):
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
        reporting.record_event(
            ctx,
            {
                "event": "out_of_memory",
                **oom,
                "resume_from": str(state.last_checkpoint(ctx.ckpt_dir)),
                "old_plan": asdict(plan),
                "new_plan": asdict(new) if new else None,
            },
        )
        trainer.accelerator.free_memory()
        del trainer, model
        devices.free_memory(ctx.device)
        if new is None:
            raise RuntimeError(
                f"{ctx.job.name}: out of memory even at micro-batch 1 with gradient checkpointing"
            )
        plan = new
        # A rerun after a kill goes on with this plan and the same step total (and so the same LR schedule).
        state.update_state(ctx.out_dir, plan=asdict(plan), max_steps=max_steps)


def train_stage(job: TrainJob, callbacks: list | None = None) -> TrainResult:
    """Fine-tune one model with QLoRA; return its adapter, child run and metrics.

    `callbacks`: extra `TrainerCallback`s (in-process callers only, e.g. tests that observe each step)."""
    out_dir = Path(job.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    def waiting() -> None:
        print(f"train {job.spec.name}: another run is training into {out_dir}; waiting for it", flush=True)

    # one run per output directory: a second identical run waits, then finds the first one's stored result
    with directory_lock(out_dir, on_wait=waiting):
        return _train_in(job, callbacks, out_dir)


def _train_in(job: TrainJob, callbacks: list | None, out_dir: Path) -> TrainResult:
    from datasets import load_from_disk

    device = devices.resolve_device(job.settings.device)
    tracker = make_tracker(job.tracking)
    stored = state.stored_result(job, tracker, out_dir)
    if stored is not None:
        return stored
    run_id, resumed = state.child_run(job, tracker, out_dir)
    ctx = Context(
        job=job,
        device=device,
        out_dir=out_dir,
        run_id=run_id,
        tracker=tracker,
        events=state.read_events(out_dir),
        extra_callbacks=list(callbacks or []),
    )
    ckpt = state.last_checkpoint(ctx.ckpt_dir)
    resumed_from = state.checkpoint_step(ckpt) if ckpt else (0 if resumed else None)
    if resumed_from is not None:
        reporting.record_event(
            ctx, {"event": "resumed", "checkpoint": str(ckpt) if ckpt else None, "step": resumed_from}
        )
    status = "FAILED"
    try:
        active = (
            tracker.active_run(run_id, system_metrics=job.tracking.system_metrics)
            if job.tracking.enabled
            else nullcontext()
        )
        with active:
            devices.reset_peak(device)
            devices.cap_memory(device, job.settings.training.gpu_memory_gib)
            use_fast = job.spec.use_fast_tokenizer
            if use_fast is None:
                use_fast = modeling.recommended_use_fast(job.model.base_model)
            tokenizer = tokenization.load_tokenizer(job.model.path, use_fast=use_fast)
            data = {
                "tokenizer": tokenizer,
                "train": load_from_disk(job.data.train.path),
                "eval": load_from_disk(job.data.eval.path) if job.data.eval is not None else None,
            }
            pre = preflight(ctx, tokenizer)
            plan = initial_plan(ctx, pre)
            reporting.log_start(ctx, pre, plan, use_fast)
            if not resumed:
                reporting.log_preflight(ctx, pre, plan)
            saved = state.read_state(out_dir)
            if saved.get("plan"):  # set after an out-of-memory error in an earlier attempt
                plan = MemoryPlan(**saved["plan"])
            done = _train(ctx, plan, data, saved.get("max_steps"))
            result = reporting.finish(ctx, pre, done, data, resumed_from)
            state.write_result(out_dir, result)
            status = "FINISHED"
            return result
    finally:
        tracker.end_run(run_id, status)
