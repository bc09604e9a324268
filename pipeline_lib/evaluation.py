"""Held-out metrics defined once, for every model, independent of batch size and tokenizer.

For a tokenized split (columns `input_ids`, `labels`, `length`, and `response_bytes` from
`pipeline_lib.tokenization`), `score_dataset` sums the negative log-likelihood (natural log) of every label
token — the response tokens and the EOS that ends each response — and counts them:

- `loss` = summed NLL / label tokens: the token mean over the whole split, the same number whatever the
  evaluation batch size (a mean of per-batch means would weight short batches more);
- `perplexity` = exp(loss);
- `bits_per_byte` = summed NLL / (UTF-8 bytes of the response texts x ln 2): the cost of encoding the same
  text, so models with different tokenizers (Llama's 32k pieces, Bloom's 250k, Falcon's 50k) are compared
  on one scale, as lm-evaluation-harness does.

Batches are planned under a token budget (`batching.plan_batches`, longest rows first) and padded with the
training collator; the budget changes memory and speed only.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass
from typing import Any

from pipeline_lib.batching import IGNORE_INDEX, pad_collate, plan_batches


@dataclass(frozen=True)
class HeldOutScore:
    """Sums over a split; the metrics are derived from them."""

    rows: int
    tokens: int  # label tokens scored
    bytes: int  # UTF-8 bytes of the responses (0 when the split does not record them)
    nll: float  # summed negative log-likelihood, nats

    @property
    def loss(self) -> float:
        return self.nll / self.tokens if self.tokens else math.nan

    @property
    def perplexity(self) -> float:
        return (
            math.exp(self.loss) if self.tokens and self.loss < 700 else math.inf if self.tokens else math.nan
        )

    @property
    def bits_per_byte(self) -> float:
        return self.nll / (self.bytes * math.log(2)) if self.bytes else math.nan

    def metrics(self, prefix: str = "eval") -> dict[str, float]:
        """`{prefix}_loss`, `{prefix}_perplexity`, `{prefix}_bits_per_byte`, `{prefix}_tokens`, `{prefix}_bytes`."""
        return {
            f"{prefix}_loss": self.loss,
            f"{prefix}_perplexity": self.perplexity,
            f"{prefix}_bits_per_byte": self.bits_per_byte,
            f"{prefix}_tokens": float(self.tokens),
            f"{prefix}_bytes": float(self.bytes),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "loss": self.loss,
            "perplexity": self.perplexity,
            "bits_per_byte": self.bits_per_byte,
        }


def token_nll(logits, labels):
    """(summed NLL over label tokens, number of label tokens) of one batch; logits predict the next token.

    Computed row by row in float32, so a large vocabulary never needs a float32 copy of the whole batch."""
    import torch

    total = torch.zeros((), dtype=torch.float64)
    count = 0
    for r in range(logits.shape[0]):
        target = labels[r, 1:].to(logits.device)
        keep = target != IGNORE_INDEX
        n = int(keep.sum())
        if not n:
            continue
        row = logits[r, :-1][keep].float()
        total += torch.nn.functional.cross_entropy(row, target[keep], reduction="sum").double().cpu()
        count += n
    return float(total), count


def score_dataset(
    model,
    dataset,
    *,
    pad_token_id: int,
    tokens_per_batch: int = 4096,
    max_rows: int | None = None,
    device: Any = None,
    bf16: bool = False,
) -> HeldOutScore:
    """Score every row of a tokenized split with `model` (eval mode, no gradients; the previous mode is
    restored). `bf16` runs the forward under bfloat16 autocast, as training does."""
    import torch

    lengths = [int(x) for x in dataset["length"]]
    if not lengths:
        return HeldOutScore(0, 0, 0, 0.0)
    column_names = getattr(dataset, "column_names", None) or list(dataset[0])
    n_bytes = sum(int(b) for b in dataset["response_bytes"]) if "response_bytes" in column_names else 0
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    was_training = model.training
    model.eval()
    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    )
    nll, tokens = 0.0, 0
    try:
        with torch.no_grad(), autocast:
            for batch in plan_batches(lengths, tokens_per_batch, max_rows):
                feats = [
                    {"input_ids": dataset[i]["input_ids"], "labels": dataset[i]["labels"]} for i in batch
                ]
                enc = pad_collate(feats, pad_token_id)
                out = model(
                    input_ids=enc["input_ids"].to(device),
                    attention_mask=enc["attention_mask"].to(device),
                    use_cache=False,
                )
                s, n = token_nll(out.logits, enc["labels"])
                nll += s
                tokens += n
    finally:
        model.train(was_training)
    return HeldOutScore(rows=len(lengths), tokens=tokens, bytes=n_bytes, nll=nll)
