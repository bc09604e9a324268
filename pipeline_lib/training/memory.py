"""The memory plan: how one optimizer step of `batch_size` rows is cut into micro-batches (with or without
gradient checkpointing) so the estimated peak stays inside the GPU memory budget, which training loss it
uses (`loss_chunk_tokens`), and what an out-of-memory error changes (`halve`). Pure arithmetic: no torch, no
model.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline_lib.config import TrainingSettings
from pipeline_lib.devices import GIB


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
    loss_chunk_tokens: int | None = None  # the chunked loss with chunks of this many tokens; None = plain

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
# plus LORA_STATE_BYTES per trainable parameter (fp32 weight, gradient, two Adam moments). The chunked loss
# (`training.loss`) holds the same per-element bytes for one chunk of tokens only.
ACTIVATION_BYTES = 128
CHECKPOINT_BYTES = 4
EAGER_SCORE_BYTES = 10
LOGIT_BYTES = 14
LORA_STATE_BYTES = 16
BUDGET_HEADROOM = 0.9  # share of the budget the estimate may use (allocator fragmentation, cuBLAS workspace)
# `training.loss: auto` chunks the loss from this vocabulary size on, where the logits are the largest part of
# a step: bloom-3b's 250k vocabulary gives 3.4 GiB of the 7.4 GiB estimated for 1,024 tokens, more than its
# 4-bit weights. For the same tokens llama-3b's 32k and falcon-rw-1b's 50k vocabularies give 0.43 and
# 0.67 GiB, which their plans fit without; they keep the plain loss, the one every GPU measurement so far was
# made with (the chunked loss runs the head's forward twice; whether leaving the prompt positions out makes
# up for it is not measured yet).
CHUNKED_LOSS_MIN_VOCAB = 100_000


def loss_chunk_tokens(settings: TrainingSettings, vocab_size: int, chunkable: bool = True) -> int | None:
    """The chunk size of the chunked loss that `settings.loss` asks for with this vocabulary, None for the
    plain loss. `chunkable`: whether the model's family allows it (`architectures.chunked_loss_exact`);
    'auto' falls back to the plain loss where it does not, 'chunked' is an error."""
    if settings.loss == "chunked" and not chunkable:
        raise ValueError("training.loss 'chunked': not exact for this model's family; use 'auto' or 'plain'")
    if settings.loss == "chunked" or (
        settings.loss == "auto" and chunkable and vocab_size >= CHUNKED_LOSS_MIN_VOCAB
    ):
        return settings.loss_chunk_tokens
    return None


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
    loss_chunk_tokens: int | None = None,
) -> float:
    """Estimated peak GPU memory (GiB, as `torch.cuda.max_memory_allocated` counts it) of one training step
    of `micro_batch` rows of `seq_len` tokens.

    static = 4-bit weights + `upcast_gib` (the non-quantized parameters' second copy in float32; default: one
    embedding matrix) + LoRA weights, gradients and Adam state (default: 20·16·hidden per layer, LoRA r=16 on
    every linear layer). Without checkpointing every layer's activations are alive when the logits are
    computed: static + layers x activations + logits. With checkpointing only the layer inputs are kept, and
    the peak is either the loss (logits) or one layer recomputed in the backward pass, whichever is larger.
    With `loss_chunk_tokens` (the chunked loss) the logits are those of at most that many tokens.

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
    logit_tokens = min(tokens, loss_chunk_tokens) if loss_chunk_tokens else tokens
    logits = logit_tokens * vocab_size * LOGIT_BYTES
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
    chunkable: bool = True,
) -> MemoryPlan:
    """Choose micro-batch, accumulation and gradient checkpointing so one step keeps `batch_size` rows
    and the estimated peak (`estimate_peak_gib`, rows of `max_length` tokens) stays under
    `BUDGET_HEADROOM` x `budget_gib`. On the CPU (or without a budget) the whole batch is one micro-batch.

    Preference: no checkpointing with the largest micro-batch that fits, else checkpointing with the largest
    micro-batch that fits (`settings.gradient_checkpointing` 'on'/'off' restricts the choice). When nothing
    fits, micro-batch 1 (with checkpointing unless it is 'off') is returned for `halve` to take over. The loss
    is `loss_chunk_tokens(settings, vocab_size, chunkable)`'s, on every device.
    """
    chunk = loss_chunk_tokens(settings, vocab_size, chunkable)
    gc_setting = settings.gradient_checkpointing
    cap = settings.tokens_per_micro_batch
    micros = [d for d in _divisors_desc(batch_size) if cap is None or d * max_length <= cap] or [1]
    if device != "cuda" or budget_gib is None:
        micro = micros[0]
        reason = "no GPU memory budget" + (f"; micro-batch capped at {cap} tokens" if cap else "")
        return MemoryPlan(
            micro,
            batch_size // micro,
            gc_setting == "on",
            micro * max_length,
            budget_gib,
            reason,
            loss_chunk_tokens=chunk,
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
            loss_chunk_tokens=chunk,
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
                    chunk,
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
        chunk,
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
            loss_chunk_tokens=plan.loss_chunk_tokens,
        )
    if not plan.gradient_checkpointing:
        return MemoryPlan(
            1,
            plan.grad_accum,
            True,
            plan.tokens_per_micro_batch,
            plan.budget_gib,
            "gradient checkpointing switched on after out-of-memory",
            loss_chunk_tokens=plan.loss_chunk_tokens,
        )
    return None
