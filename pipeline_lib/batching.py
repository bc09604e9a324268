"""Training batches as a plan of optimizer steps, their collators, and the Trainer that uses them.

The contract: `batch_size` (the config's effective batch) is the number of rows in every optimizer step, and
the rows of step k of an epoch depend only on the data, the seed, the epoch and `batch_size` — never on how a
step is cut into micro-batches. So when an out-of-memory error halves the micro-batch (twice the
accumulation), the Trainer's resume, which skips `global_step x accumulation` micro-batches, skips exactly the
steps already trained, and every epoch still trains every row once.

Pieces:

- `plan_steps`: an epoch as a list of steps (lists of row indices). Length-grouped by default: rows are
  shuffled, cut into chunks of `MEGABATCH_STEPS` steps' worth, each chunk sorted by length and cut into steps
  of `batch_size` rows, and the steps shuffled (the step holding the longest row first, so a memory peak shows
  at once). Only the last step can be short (`N mod batch_size` rows), and it is always last.
- `StepSampler`: that plan as a `batch_sampler` of micro-batches: each step cut into `ceil(rows /
  micro_batch)` micro-batches of rows of similar length; `set_epoch` (the Trainer calls it) gives every epoch
  a new plan, deterministically.
- `plan_batches` / `padding_share`: batches under a token budget (rows x longest row), for evaluation,
  where no step contract applies, and the padding waste of a plan.
- `pad_collate` / `PadCollator`: right padding, attention mask, padded labels -100 (by position, never by token id).
- `pack_collate`: rows concatenated into one sequence with restarting `position_ids` and no attention mask;
  only for models where `supports_exact_packing` is true (see there for what was verified).
The Trainer that uses them is `pipeline_lib.training.hf_trainer.QabotTrainer`.

"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Sampler

from pipeline_lib.architectures import packs_exactly

IGNORE_INDEX = -100
MEGABATCH_STEPS = 16  # steps' worth of rows sorted together in `plan_steps`

# ---- planning ------------------------------------------------------------------------------------------------


def _derive_seed(*parts: int) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "big")


def _capacity(length: int, tokens_per_batch: int, max_rows: int | None) -> int:
    """Rows a batch whose longest row is `length` may hold (at least 1)."""
    cap = max(1, tokens_per_batch // max(1, length))
    return min(cap, max_rows) if max_rows else cap


def _sorted_desc(idx: list[int], lengths: Sequence[int]) -> list[int]:
    return sorted(idx, key=lambda i: -lengths[i])  # stable: ties keep their (shuffled) order


def plan_batches(
    lengths: Sequence[int], tokens_per_batch: int, max_rows: int | None = None
) -> list[list[int]]:
    """Row indices in batches under a token budget, for evaluation: all rows sorted longest first and cut
    greedily, so a batch holds rows x longest row <= `tokens_per_batch` (a row longer than the budget gets a
    batch of its own) and at most `max_rows` rows. Deterministic; the fewest batches any plan can have (a
    batch's capacity depends only on its longest row)."""
    if tokens_per_batch < 1:
        raise ValueError("tokens_per_batch must be positive")
    if max_rows is not None and max_rows < 1:
        raise ValueError("max_rows must be positive or None")
    lengths = [int(x) for x in lengths]
    batches: list[list[int]] = []
    current: list[int] = []
    cap = 0
    for i in _sorted_desc(list(range(len(lengths))), lengths):
        if current and len(current) >= cap:
            batches.append(current)
            current = []
        if not current:
            cap = _capacity(lengths[i], tokens_per_batch, max_rows)
        current.append(i)
    if current:
        batches.append(current)
    return batches


def padding_share(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> float:
    """Share of the padded token slots (rows x longest row, summed over batches) that are padding."""
    slots = real = 0
    for b in batches:
        if not b:
            continue
        ls = [int(lengths[i]) for i in b]
        slots += len(ls) * max(ls)
        real += sum(ls)
    return 0.0 if slots == 0 else 1.0 - real / slots


def plan_steps(
    lengths: Sequence[int],
    batch_size: int,
    seed: int,
    group_by_length: bool = True,
    megabatch_steps: int = MEGABATCH_STEPS,
) -> list[list[int]]:
    """One epoch as optimizer steps of `batch_size` row indices each (see the module docstring).

    Every index appears exactly once; every step has `batch_size` rows but the last, which has the rest.
    Deterministic for a given `seed` (use one per epoch); independent of any micro-batch size. Within a step
    the rows are sorted longest first, so consecutive micro-batches hold rows of similar length.
    `group_by_length=False`: plain random steps (what a Trainer without grouping does).
    """
    if batch_size < 1:
        raise ValueError("batch_size must be positive")
    lengths = [int(x) for x in lengths]
    n = len(lengths)
    if n == 0:
        return []
    rng = random.Random(_derive_seed(seed, 1))
    idx = list(range(n))
    rng.shuffle(idx)
    full = n - n % batch_size  # rows in full steps; the rest form the last, short step
    head, tail = idx[:full], idx[full:]
    if group_by_length:
        chunk = batch_size * max(1, megabatch_steps)
        head = [
            i for start in range(0, full, chunk) for i in _sorted_desc(head[start : start + chunk], lengths)
        ]
    steps = [_sorted_desc(head[k : k + batch_size], lengths) for k in range(0, full, batch_size)]
    rng.shuffle(steps)
    if group_by_length and steps:
        first = max(range(len(steps)), key=lambda j: lengths[steps[j][0]])
        steps[0], steps[first] = steps[first], steps[0]
    if tail:
        steps.append(_sorted_desc(tail, lengths))
    return steps


def micro_batches(step: Sequence[int], micro_batch: int) -> list[list[int]]:
    """A step's rows cut into consecutive micro-batches of `micro_batch` rows (the last may be smaller)."""
    return [list(step[k : k + micro_batch]) for k in range(0, len(step), micro_batch)]


def expected_padding_share(
    lengths: Sequence[int],
    batch_size: int,
    micro_batch: int,
    group_by_length: bool = True,
    seed: int = 0,
) -> float:
    """Padding share of one epoch's micro-batches under the step plan (`StepSampler` with these settings)."""
    lengths = [int(x) for x in lengths]
    steps = plan_steps(lengths, batch_size, _derive_seed(seed, 0), group_by_length)
    return padding_share([mb for st in steps for mb in micro_batches(st, micro_batch)], lengths)


class StepSampler(Sampler[list[int]]):
    """Yields the micro-batches of `plan_steps` (use as `DataLoader(batch_sampler=...)`).

    Epoch `e` uses the plan for seed (seed, e) (`set_epoch`, which the Trainer calls before each epoch), so
    every epoch is a new grouping; all epochs have the same number of micro-batches, `len()`, from which the
    Trainer derives the steps per epoch (`ceil(len / accumulation)` = the number of steps) and the LR schedule.
    Deterministic: a resumed run sees the same steps. Not rank-aware: under several processes `accelerate`
    deals whole micro-batches out to ranks.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        micro_batch: int,
        seed: int = 0,
        group_by_length: bool = True,
    ) -> None:
        if micro_batch < 1 or batch_size % micro_batch:
            raise ValueError(f"micro_batch {micro_batch} must divide batch_size {batch_size}")
        self.lengths = [int(x) for x in lengths]
        self.batch_size = batch_size
        self.micro_batch = micro_batch
        self.seed = seed
        self.group_by_length = group_by_length
        self.epoch = 0
        self._cache: tuple[int, list[list[int]]] | None = None
        n = len(self.lengths)
        full, rest = divmod(n, batch_size)
        self._len = full * (batch_size // micro_batch) + -(-rest // micro_batch)

    def steps(self) -> list[list[int]]:
        """The steps of the current epoch."""
        if self._cache is None or self._cache[0] != self.epoch:
            plan = plan_steps(
                self.lengths, self.batch_size, _derive_seed(self.seed, self.epoch), self.group_by_length
            )
            self._cache = (self.epoch, plan)
        return self._cache[1]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        for step in self.steps():
            yield from micro_batches(step, self.micro_batch)

    def __len__(self) -> int:
        return self._len


# ---- collators -----------------------------------------------------------------------------------------------


def _as_list(x: Any) -> list[int]:
    return x.tolist() if hasattr(x, "tolist") else list(x)


def pad_collate(
    features: Sequence[dict[str, Any]], pad_token_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples: input_ids (pad id), attention_mask (0 on padding), labels (-100 on padding).

    Padding is masked by position, so the pad id may equal EOS. Other keys (such as `length`) are ignored.
    Without `labels` in the features, none are returned.
    """
    ids = [_as_list(f["input_ids"]) for f in features]
    longest = max(len(x) for x in ids)
    if pad_to_multiple_of:
        longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    n = len(ids)
    input_ids = torch.full((n, longest), int(pad_token_id), dtype=torch.long)
    attention_mask = torch.zeros((n, longest), dtype=torch.long)
    has_labels = "labels" in features[0]
    labels = torch.full((n, longest), IGNORE_INDEX, dtype=torch.long) if has_labels else None
    for r, (f, x) in enumerate(zip(features, ids, strict=True)):
        input_ids[r, : len(x)] = torch.as_tensor(x, dtype=torch.long)
        attention_mask[r, : len(x)] = 1
        if labels is not None:
            y = _as_list(f["labels"])
            if len(y) != len(x):
                raise ValueError(f"row {r}: {len(y)} labels for {len(x)} input ids")
            labels[r, : len(y)] = torch.as_tensor(y, dtype=torch.long)
    out = {"input_ids": input_ids, "attention_mask": attention_mask}
    if labels is not None:
        out["labels"] = labels
    return out


@dataclass(frozen=True)
class PadCollator:
    """`pad_collate` with a fixed pad id, as a picklable object (for DataLoader workers)."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return pad_collate(features, self.pad_token_id, self.pad_to_multiple_of)


def pack_collate(features: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Concatenate examples into one row: input_ids, labels and position_ids (restarting at 0 per example).

    No attention mask (its absence is what makes transformers build the per-example block-diagonal mask from
    the position_ids) and `use_cache=False` (with a cache the mask builder ignores the packing). The first label
    of each example is forced to -100, so no token is ever predicted across a boundary. Exact only where
    `supports_exact_packing(model)` is true.
    """
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for f in features:
        x = _as_list(f["input_ids"])
        y = _as_list(f["labels"]) if "labels" in f else [IGNORE_INDEX] * len(x)
        if len(y) != len(x):
            raise ValueError(f"{len(y)} labels for {len(x)} input ids")
        ids += x
        labels += [IGNORE_INDEX] + y[1:]
        positions += range(len(x))
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
        "use_cache": False,
    }


def _base_model(model: Any) -> Any:
    get_base = getattr(model, "get_base_model", None)  # PEFT wrappers
    return get_base() if callable(get_base) else model


def supports_exact_packing(model: Any) -> bool:
    """True where packing through position_ids gives each row the same logits as running it alone, by the
    model's family and attention implementation (`architectures.Family.exact_packing`, verified by
    tests/test_batching.py): Llama with eager, sdpa and flex_attention. Bloom and Falcon (ALiBi) never build a
    per-row mask from position_ids, so packed rows see the rows before them; they get length-grouped padded
    batches instead. Unverified families and implementations (flash-attention included) report False."""
    config = getattr(_base_model(model), "config", None)
    return config is not None and packs_exactly(config)


__all__ = [
    "IGNORE_INDEX",
    "PadCollator",
    "StepSampler",
    "expected_padding_share",
    "micro_batches",
    "pack_collate",
    "pad_collate",
    "padding_share",
    "plan_batches",
    "plan_steps",
    "supports_exact_packing",
]
