"""Assembling one training: the pre-flight load, the memory plan from it, the model with its LoRA adapter
and the `QabotTrainer` with its arguments and callbacks."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline_lib import architectures, devices, modeling
from pipeline_lib.batching import PadCollator
from pipeline_lib.devices import GIB
from pipeline_lib.training.faults import fault_callbacks
from pipeline_lib.training.hf_trainer import QabotTrainer
from pipeline_lib.training.job import PROGRESS_FILE, TrainJob
from pipeline_lib.training.memory import MemoryPlan, plan_memory


@dataclass
class Context:
    """What the steps of one training share."""

    job: TrainJob
    device: str
    out_dir: Path
    run_id: str
    tracker: Any
    events: list[dict]
    extra_callbacks: list = field(default_factory=list)

    @property
    def ckpt_dir(self) -> Path:
        return self.out_dir / "checkpoints"


def progress_callback(path: Path):
    """Writes the step reached (and the steps in all) to `path` after every optimizer step, atomically, so a
    process showing progress (the flow's progress artifact) can read it while the training runs elsewhere."""
    from transformers import TrainerCallback

    from pipeline_lib.files import write_json

    class Progress(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            write_json(path, {"step": state.global_step, "max_steps": state.max_steps, "epoch": state.epoch})

    return Progress()


def preflight(ctx: Context, tokenizer) -> dict[str, Any]:
    """Load the base once as for inference: 4-bit, tokenizer and LoRA checks, and the sizes the plan needs."""
    import torch
    from peft import get_peft_model

    job, s = ctx.job, ctx.job.settings
    model = modeling.load_model(job.model.path, s.quantization, ctx.device, for_training=False)
    qreport = modeling.quantization_report(model)
    modeling.check_quantized(qreport, job.name, expected=s.quantization.load_in_4bit)
    treport = modeling.tokenizer_report(tokenizer, job.model.base_model, model.config)
    dims = architectures.dims(model.config)
    # prepare_model_for_kbit_training keeps a float32 copy of every 16-bit parameter
    upcast = sum(
        p.numel() * (4 - p.element_size())
        for p in model.parameters()
        if s.quantization.load_in_4bit and p.dtype in (torch.bfloat16, torch.float16)
    )
    dims["upcast_gib"] = upcast / GIB
    targets = modeling.resolve_lora_targets(model, s.lora, job.name)
    chunkable = architectures.chunked_loss_exact(model.config)
    model = get_peft_model(model, modeling.lora_config(s.lora, targets, model, job.name))
    lreport = modeling.lora_report(model, job.name)
    del model
    devices.free_memory(ctx.device)
    return {
        "quantization": qreport,
        "tokenizer": treport,
        "lora": lreport,
        "targets": targets,
        "dims": dims,
        "chunkable": chunkable,
    }


def initial_plan(ctx: Context, pre: dict) -> MemoryPlan:
    spec, ts = ctx.job.spec, ctx.job.settings.training
    budget = ts.gpu_memory_gib or devices.total_memory_gib(ctx.device)
    return plan_memory(
        spec.batch_size,
        spec.max_length,
        ts,
        device=ctx.device,
        budget_gib=budget,
        weights_gib=pre["quantization"]["footprint_bytes"] / GIB,
        trainable_params=pre["lora"]["trainable_params"],
        chunkable=pre["chunkable"],
        **pre["dims"],
    )


def training_arguments(ctx: Context, plan: MemoryPlan, max_steps: int | None, eval_on_start: bool):
    from transformers import TrainingArguments

    spec, ts = ctx.job.spec, ctx.job.settings.training
    has_eval = ctx.job.data.eval is not None
    return TrainingArguments(
        output_dir=str(ctx.ckpt_dir),
        num_train_epochs=spec.epochs,
        max_steps=max_steps or spec.max_steps or -1,
        per_device_train_batch_size=plan.micro_batch,
        gradient_accumulation_steps=plan.grad_accum,
        gradient_checkpointing=plan.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if plan.gradient_checkpointing else None,
        learning_rate=ctx.job.learning_rate,
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
        bf16=ts.bf16 and devices.bf16_supported(ctx.device),
        use_cpu=ctx.device == "cpu",
        report_to=[],
        remove_unused_columns=False,
        dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,
        run_name=ctx.job.name,
    )


def build_trainer(
    ctx: Context, plan: MemoryPlan, data: dict, max_steps: int | None, resume_from: Path | None
):
    """A fresh model (4-bit base + LoRA, the same initialisation every time) and its Trainer for `plan`."""
    from peft import get_peft_model
    from transformers import set_seed

    job, s = ctx.job, ctx.job.settings
    model = modeling.load_model(
        job.model.path,
        s.quantization,
        ctx.device,
        for_training=True,
        gradient_checkpointing=plan.gradient_checkpointing,
    )
    targets = modeling.resolve_lora_targets(model, s.lora, job.name)
    set_seed(s.training.seed)
    model = get_peft_model(model, modeling.lora_config(s.lora, targets, model, job.name))
    args = training_arguments(ctx, plan, max_steps, eval_on_start=resume_from is None)
    callbacks = [c for c in [ctx.tracker.trainer_callback(ctx.run_id)] if c is not None]
    callbacks += [progress_callback(ctx.out_dir / PROGRESS_FILE)] + fault_callbacks() + ctx.extra_callbacks
    trainer = QabotTrainer(
        model=model,
        args=args,
        train_dataset=data["train"],
        eval_dataset=data["eval"],
        data_collator=PadCollator(data["tokenizer"].pad_token_id),
        callbacks=callbacks,
        batch_size=job.spec.batch_size,
        group_by_length=s.training.group_by_length,
        eval_tokens_per_batch=plan.tokens_per_micro_batch or plan.micro_batch * job.spec.max_length,
        loss_chunk_tokens=plan.loss_chunk_tokens,
    )
    return model, trainer, targets
