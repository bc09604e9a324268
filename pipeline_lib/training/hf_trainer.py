"""`QabotTrainer`: the transformers Trainer with the step plan of `pipeline_lib.batching` and a token-mean
evaluation (`pipeline_lib.evaluation`).

Loss normalisation with gradient accumulation (transformers 5.x, verified by tests): the Trainer counts the
label tokens of all micro-batches of one optimizer step (`num_items_in_batch`, over `labels[..., 1:]`), the
model's loss is the *sum* of token losses divided by that count, and the micro-batch losses are not divided
by the number of accumulation steps. The accumulated gradient is therefore the gradient of the mean over
every label token of the step, whatever the number of rows or tokens of each micro-batch. `QabotTrainer`
keeps this true for models whose forward does not take loss keyword arguments by computing the same
token-sum loss itself (`token_sum_loss`), and with `loss_chunk_tokens` computes that loss chunk by chunk
without the logits of every position (`training.loss`).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import Trainer

from pipeline_lib.architectures import chunked_loss_exact
from pipeline_lib.batching import (
    IGNORE_INDEX,
    PadCollator,
    StepSampler,
    _base_model,
    pack_collate,
    supports_exact_packing,
)
from pipeline_lib.evaluation import score_dataset
from pipeline_lib.training.loss import chunked_token_sum_loss


def token_sum_loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
    """Causal-LM loss: sum of the token losses over `num_items_in_batch` (the step's label tokens).

    The same normalisation as transformers' own causal-LM loss; used as `compute_loss_func` for models whose
    forward does not take `num_items_in_batch`. Without a count it is the mean over this batch's tokens.
    """
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
    logits = logits[..., :-1, :].float()
    target = labels[..., 1:].to(logits.device)
    total = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    if num_items_in_batch is None:
        num_items_in_batch = (target != IGNORE_INDEX).sum().clamp(min=1)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def _column(dataset: Any, name: str) -> list[int]:
    if hasattr(dataset, "column_names"):
        if name not in dataset.column_names:
            raise ValueError(f"the training dataset has no {name!r} column (tokenize it with tokenize_split)")
        return [int(x) for x in dataset[name]]
    return [int(dataset[i][name]) for i in range(len(dataset))]


def step_train_dataloader(
    trainer: Any,
    dataset: Any,
    batch_size: int,
    micro_batch: int,
    group_by_length: bool = True,
    length_column: str = "length",
    collate_fn: Any = None,
) -> DataLoader:
    """The training DataLoader of `trainer` for `dataset` (with a `length` column), batched by `StepSampler`.

    Mirrors `Trainer._get_dataloader`: unused columns removed, the Trainer's dataloader settings and worker
    seeding, then `trainer.accelerator.prepare`. The sampler is seeded with `args.data_seed` (else
    `args.seed`); `len()` of the result is the exact number of micro-batches per epoch.
    """
    import datasets
    from transformers.trainer_utils import seed_worker

    args = trainer.args
    if args.gradient_accumulation_steps != batch_size // micro_batch:
        raise ValueError(
            f"gradient_accumulation_steps {args.gradient_accumulation_steps} must be "
            f"batch_size {batch_size} / micro_batch {micro_batch}"
        )
    lengths = _column(dataset, length_column)
    seed = args.data_seed if args.data_seed is not None else args.seed
    sampler = StepSampler(lengths, batch_size, micro_batch, seed=seed, group_by_length=group_by_length)
    collator = collate_fn if collate_fn is not None else trainer.data_collator
    if isinstance(dataset, datasets.Dataset):
        dataset = trainer._remove_unused_columns(dataset, description="Training")
    else:
        collator = trainer._get_collator_with_removed_columns(collator, description="Training")
    params: dict[str, Any] = {
        "batch_sampler": sampler,
        "collate_fn": collator,
        "num_workers": args.dataloader_num_workers,
        "pin_memory": args.dataloader_pin_memory,
        "persistent_workers": args.dataloader_persistent_workers,
        "worker_init_fn": partial(
            seed_worker, num_workers=args.dataloader_num_workers, rank=args.process_index
        ),
    }
    if args.dataloader_num_workers > 0:
        params["prefetch_factor"] = args.dataloader_prefetch_factor
        params["multiprocessing_context"] = args.dataloader_multiprocessing_context
    return trainer.accelerator.prepare(DataLoader(dataset, **params))


def _pad_id(processing_class: Any, model: Any) -> int:
    for owner in (processing_class, getattr(_base_model(model), "config", None)):
        for attr in ("pad_token_id", "eos_token_id"):
            value = getattr(owner, attr, None)
            if isinstance(value, int):
                return value
    return 0


class QabotTrainer(Trainer):
    """A `transformers.Trainer` with the step contract of this module and a token-mean evaluation.

    Extra keyword arguments: `batch_size` (rows per optimizer step; `per_device_train_batch_size` x
    `gradient_accumulation_steps` must equal it), `group_by_length` (default True), `packing` (concatenate
    each micro-batch's rows; only where `supports_exact_packing`), `eval_tokens_per_batch` (token budget of an
    evaluation batch; it changes speed and memory, never the result), `length_column` (default "length"),
    `loss_chunk_tokens` (None: the model's own loss on its logits; a number: `training.loss`'s chunked loss
    with that many label tokens per chunk, where `architectures.chunked_loss_exact`, on one process).
    Without a `data_collator` it uses `pad_collate` (or `pack_collate`). The training loss is a token mean
    over each optimizer step (see the module docstring), with either loss, also for models whose forward does
    not take `num_items_in_batch`; `evaluate()` reports `eval_loss` as the token mean over the whole
    evaluation set (always from the logits), with `eval_perplexity`, `eval_bits_per_byte` and the token and
    byte counts (`pipeline_lib.evaluation`).
    """

    def __init__(
        self,
        *args: Any,
        batch_size: int,
        group_by_length: bool = True,
        packing: bool = False,
        eval_tokens_per_batch: int = 4096,
        length_column: str = "length",
        loss_chunk_tokens: int | None = None,
        **kwargs: Any,
    ) -> None:
        self.batch_size = int(batch_size)
        self.group_by_length = group_by_length
        self.packing = packing
        self.eval_tokens_per_batch = int(eval_tokens_per_batch)
        self.length_column = length_column
        user_collator = kwargs.get("data_collator")
        super().__init__(*args, **kwargs)
        micro = self.args.per_device_train_batch_size
        if micro * self.args.gradient_accumulation_steps != self.batch_size:
            raise ValueError(
                f"micro-batch {micro} x accumulation {self.args.gradient_accumulation_steps} "
                f"must equal batch_size {self.batch_size}"
            )
        if packing and not supports_exact_packing(self.model):
            raise ValueError(
                "packing=True: packing is not exact for this model/attention implementation; "
                "use length-grouped padded batches (packing=False)"
            )
        self.loss_chunk_tokens = loss_chunk_tokens
        if loss_chunk_tokens is not None:
            config = getattr(_base_model(self.model), "config", None)
            if loss_chunk_tokens < 1 or not chunked_loss_exact(config):
                raise ValueError(
                    f"loss_chunk_tokens={loss_chunk_tokens}: the chunked loss needs a positive chunk size and "
                    "a model family whose logits are its output head applied to its decoder's output "
                    "(architectures.chunked_loss_exact)"
                )
            if self.accelerator.num_processes > 1 or self.args.n_gpu > 1:
                # it calls the model's decoder directly, past any data-parallel wrapper
                raise ValueError("the chunked loss runs on one process and one device only")
        self.pad_token_id = _pad_id(self.processing_class, self.model)
        if user_collator is None:
            self.data_collator = pack_collate if packing else PadCollator(self.pad_token_id)
        if not self.model_accepts_loss_kwargs and self.compute_loss_func is None:
            self.compute_loss_func = token_sum_loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The Trainer's loss, or with `loss_chunk_tokens` the same token-sum loss computed chunk by chunk
        (`training.loss`); outputs, when asked for, always come from the model's own forward."""
        if self.loss_chunk_tokens is None or return_outputs or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        return chunked_token_sum_loss(
            self.accelerator.unwrap_model(model), inputs, labels, num_items_in_batch, self.loss_chunk_tokens
        )

    def get_train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        return step_train_dataloader(
            self,
            self.train_dataset,
            self.batch_size,
            self.args.per_device_train_batch_size,
            self.group_by_length,
            length_column=self.length_column,
        )

    def evaluate(
        self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        """Token-mean loss, perplexity and bits per byte over the whole evaluation set; logged like the
        Trainer's own evaluation (callbacks see `on_evaluate`)."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("Trainer: evaluation requires an eval_dataset.")
        result = score_dataset(
            self.model,
            dataset,
            pad_token_id=self.pad_token_id,
            tokens_per_batch=self.eval_tokens_per_batch,
            device=self.args.device,
            bf16=self.args.bf16,
        )
        metrics = result.metrics(metric_key_prefix)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics
