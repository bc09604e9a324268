"""The causal-LM training loss computed in chunks of label tokens, so the [tokens x vocabulary] logits never
exist at once.

`token_sum_loss` (`training.hf_trainer`) takes the model's logits of every position: for a 250k vocabulary
(bloom-3b) 1,024 tokens give 0.5 GiB of bf16 logits, and the loss adds their float32 upcast, the
log-softmax and the gradients, 3.4 GiB in all (`training.memory`). Here the model's decoder runs without its
output head; the head is applied to `chunk_tokens` label positions at a time under non-reentrant
`torch.utils.checkpoint`, which keeps only each chunk's hidden states and targets for the backward pass and
recomputes its logits there, one chunk after the other (the autograd engine finishes one chunk's backward
before it starts the next: their nodes were created in sequence). At any time at most one chunk's logits,
their float32 upcast, log-softmax and gradients exist.

The loss is the same function as `token_sum_loss`: causal shift (hidden state t predicts label t+1), labels
-100 ignored, logits upcast to float32 before the log-softmax (as transformers does), the sum of the token
losses divided by `num_items_in_batch` (the optimizer step's label tokens, counted by the Trainer; this
batch's own count without it). Positions without a label are left out before the head is applied: they
add nothing to the loss and get a zero gradient either way, and the head does no work for the prompt. Only
the order of the float32 sums differs (tests/test_loss.py compares loss and gradients).

It relies on the model's logits being `get_output_embeddings()(get_decoder()(...)[0])`, with no scaling or
soft-capping between: `architectures.chunked_loss_exact` says for which families that holds.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from pipeline_lib.batching import IGNORE_INDEX, _base_model


def _chunk_loss(head: torch.nn.Module, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return F.cross_entropy(logits, target, reduction="sum")


def linear_cross_entropy_sum(
    hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor, chunk_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the next-token cross-entropies, label tokens) of `head(hidden)` against `labels` shifted by one.

    `hidden`: [rows, positions, hidden] final hidden states (after the final norm); `head`: the output
    embeddings (any module mapping [n, hidden] to [n, vocabulary]: bias, tied weights, LoRA or 4-bit layers
    included); `labels`: [rows, positions] with IGNORE_INDEX where nothing is predicted. The head sees at
    most `chunk_tokens` positions at a time, in the forward and in the backward pass."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be at least 1, got {chunk_tokens}")
    target = labels[..., 1:].to(hidden.device)
    keep = target != IGNORE_INDEX
    h = hidden[..., :-1, :][keep]  # [label tokens, hidden]: the positions that predict a label
    y = target[keep]
    total = h[:0].float().sum()  # zero, on the graph even without a label
    for h_chunk, y_chunk in zip(h.split(chunk_tokens), y.split(chunk_tokens), strict=True):
        total = total + checkpoint(_chunk_loss, head, h_chunk, y_chunk, use_reentrant=False)
    return total, keep.sum()


def chunked_token_sum_loss(
    model: Any, inputs: dict[str, Any], labels: torch.Tensor, num_items_in_batch: Any, chunk_tokens: int
) -> torch.Tensor:
    """`token_sum_loss` of `model` (a causal LM, or a PEFT wrapper of one) on `inputs` (the batch without its
    labels), computed chunk by chunk: the decoder gives the final hidden states and the output head is
    applied by `linear_cross_entropy_sum`, so the model never computes the logits of every position."""
    lm = _base_model(model)
    hidden = lm.get_decoder()(**inputs)[0]
    total, count = linear_cross_entropy_sum(hidden, lm.get_output_embeddings(), labels, chunk_tokens)
    if num_items_in_batch is None:
        num_items_in_batch = count.clamp(min=1)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch
