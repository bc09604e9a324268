"""Length-grouped batches under a token budget, their collators, and a Trainer that uses them.

Why: padding every batch to its longest row wastes ~35% of the tokens at 4 rows and ~55% at 16 (Alpaca,
see the data notes); grouping rows of similar length under a token budget keeps padding under ~10% and the
memory of every micro-batch bounded (rows x longest row <= budget), so short rows come many to a batch.

Pieces:

- `plan_batches` / `padding_share`: the plan (lists of row indices) and its padding waste.
- `TokenBudgetBatchSampler`: the plan as a `torch.utils.data.Sampler` of index lists (a `batch_sampler`), with
  `set_epoch`; every epoch is a new random plan with the same number of batches.
- `pad_collate` / `PadCollator`: right padding, attention mask, padded labels -100 (by position, never by token id).
- `pack_collate`: rows concatenated into one sequence with restarting `position_ids` and no attention mask;
  only for models where `supports_exact_packing` is true (see there for what was verified).
- `budget_train_dataloader` / `BudgetTrainer`: the Trainer integration.

Loss normalisation with gradient accumulation (transformers 5.x, verified by tests): the Trainer counts the
label tokens of all micro-batches of one optimizer step (`num_items_in_batch`, over `labels[..., 1:]`), the
model's loss is the *sum* of token losses divided by that count, and the micro-batch losses are not divided
by the number of accumulation steps. The accumulated gradient is therefore the gradient of the mean over
every label token of the step, whatever the number of rows or tokens of each micro-batch, which is what
variable-size batches need. `BudgetTrainer` keeps this true for models whose forward does not take loss
keyword arguments by computing the same token-sum loss itself (`token_sum_loss`).
"""

from __future__ import annotations

import hashlib
import random
import statistics
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler
from transformers import Trainer

IGNORE_INDEX = -100
MEGABATCH_BATCHES = 32  # batches' worth of rows sorted together: larger = less padding, less randomness

# Attention implementations for which packing through position_ids was checked to give the same per-row
# logits and losses as running each row alone (fp32, tests/test_batching.py; flex_attention by hand on CPU).
# transformers 5.x builds a block-diagonal causal mask from restarting position_ids when no attention mask and
# no cache are passed, and Llama's rotary embeddings read the same position_ids.
# Bloom and Falcon (ALiBi) are absent on purpose: their forward never passes position_ids to the mask
# builder (Bloom does not even take them), so packed rows attend to the rows before them.
_EXACT_PACKING: dict[str, frozenset[str]] = {
    "llama": frozenset({"eager", "sdpa", "flex_attention"}),
}


# ---- planning ------------------------------------------------------------------------------------------------


def _derive_seed(*parts: int) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "big")


def _capacity(length: int, tokens_per_batch: int, max_rows: int | None) -> int:
    """Rows a batch whose longest row is `length` may hold (at least 1)."""
    cap = max(1, tokens_per_batch // max(1, length))
    return min(cap, max_rows) if max_rows else cap


def _greedy(order: Sequence[int], lengths: Sequence[int], tokens_per_batch: int, max_rows: int | None):
    """Cut `order` (longest first) into batches: add rows while rows x longest <= budget and rows <= max_rows."""
    batches: list[list[int]] = []
    current: list[int] = []
    cap = 0
    for i in order:
        if current and len(current) >= cap:
            batches.append(current)
            current = []
        if not current:
            cap = _capacity(lengths[i], tokens_per_batch, max_rows)
        current.append(i)
    if current:
        batches.append(current)
    return batches


def _sorted_desc(idx: list[int], lengths: Sequence[int]) -> list[int]:
    return sorted(idx, key=lambda i: -lengths[i])  # stable: ties keep their (shuffled) order


def _megabatch_plan(lengths, tokens_per_batch, max_rows, rng: random.Random, megabatch_batches: int):
    n = len(lengths)
    idx = list(range(n))
    rng.shuffle(idx)
    typical = _capacity(int(statistics.median(lengths)), tokens_per_batch, max_rows)
    chunk = max(1, megabatch_batches * typical)
    batches: list[list[int]] = []
    for start in range(0, n, chunk):
        batches.extend(
            _greedy(_sorted_desc(idx[start : start + chunk], lengths), lengths, tokens_per_batch, max_rows)
        )
    return batches


def _global_plan(lengths, tokens_per_batch, max_rows, rng: random.Random | None):
    """All rows sorted at once: the fewest batches any plan can have (see `plan_batches`)."""
    idx = list(range(len(lengths)))
    if rng is not None:
        rng.shuffle(idx)  # random order among rows of equal length
    return _greedy(_sorted_desc(idx, lengths), lengths, tokens_per_batch, max_rows)


def _merge_to(batches, target, lengths, tokens_per_batch, max_rows):
    """Merge neighbouring (by length) batches while the merged batch still fits, until `target` batches."""
    batches = sorted(batches, key=lambda b: -max(lengths[i] for i in b))
    k = 0
    while len(batches) > target and k < len(batches) - 1:
        a, b = batches[k], batches[k + 1]
        longest = max(lengths[i] for i in a + b)
        if len(a) + len(b) <= _capacity(longest, tokens_per_batch, max_rows):
            batches[k : k + 2] = [_sorted_desc(a + b, lengths)]
        else:
            k += 1
    return batches


def _split_to(batches, target, lengths):
    """Halve the batches with the most rows until there are `target` batches (halves fit the same budget)."""
    batches = list(batches)
    while len(batches) < target:
        k = max(range(len(batches)), key=lambda j: len(batches[j]))
        if len(batches[k]) < 2:
            raise ValueError(f"cannot make {target} batches out of {sum(map(len, batches))} rows")
        b = _sorted_desc(batches[k], lengths)
        half = len(b) // 2
        batches[k : k + 1] = [b[:half], b[half:]]
    return batches


def plan_batches(
    lengths: Sequence[int],
    tokens_per_batch: int,
    max_rows: int | None,
    seed: int,
    shuffle: bool = True,
    *,
    num_batches: int | None = None,
    megabatch_batches: int = MEGABATCH_BATCHES,
) -> list[list[int]]:
    """Group row indices into batches of similar length under a token budget.

    - Every index appears exactly once. A batch holds rows x longest row <= `tokens_per_batch` and at most
      `max_rows` rows; a row longer than the budget gets a batch of its own.
    - `shuffle=True`: the rows are shuffled, cut into chunks of about `megabatch_batches` batches' worth,
      each chunk is sorted by length and cut greedily, and the batch order is shuffled; the batch holding the
      longest row goes first, so a memory peak shows at the first step. Deterministic for a given `seed`;
      different seeds give different plans (use one per epoch).
    - `shuffle=False`: all rows sorted longest first and cut greedily: deterministic, ignores `seed`, and has
      the fewest batches any plan can have (cutting the length-sorted order greedily is optimal, since a
      batch's capacity only depends on its longest row).
    - `num_batches`: make exactly that many batches (splitting the fullest batches, or merging neighbours;
      when merging cannot get there, a re-shuffled or fully sorted plan is used), so that every epoch has
      the same number of steps.
    """
    if tokens_per_batch < 1:
        raise ValueError("tokens_per_batch must be positive")
    if max_rows is not None and max_rows < 1:
        raise ValueError("max_rows must be positive or None")
    lengths = [int(x) for x in lengths]
    n = len(lengths)
    if n == 0:
        return []
    if num_batches is not None and not 1 <= num_batches <= n:
        raise ValueError(f"num_batches must be between 1 and {n}")

    if not shuffle:
        batches = _global_plan(lengths, tokens_per_batch, max_rows, None)
        if num_batches is not None:
            if len(batches) > num_batches:
                raise ValueError(f"{n} rows need at least {len(batches)} batches under this budget")
            batches = _split_to(batches, num_batches, lengths)
            batches.sort(key=lambda b: -lengths[b[0]])
        return batches

    rng = random.Random(_derive_seed(seed, 0))
    batches = _megabatch_plan(lengths, tokens_per_batch, max_rows, rng, megabatch_batches)
    if num_batches is not None:
        attempt = 0
        while len(batches) > num_batches:
            batches = _merge_to(batches, num_batches, lengths, tokens_per_batch, max_rows)
            if len(batches) <= num_batches:
                break
            attempt += 1
            if attempt < 4:
                batches = _megabatch_plan(
                    lengths,
                    tokens_per_batch,
                    max_rows,
                    random.Random(_derive_seed(seed, attempt)),
                    megabatch_batches,
                )
            else:
                batches = _global_plan(lengths, tokens_per_batch, max_rows, rng)
                if len(batches) > num_batches:
                    raise ValueError(f"{n} rows need at least {len(batches)} batches under this budget")
        batches = _split_to(batches, num_batches, lengths)
    rng.shuffle(batches)
    first = max(range(len(batches)), key=lambda j: max(lengths[i] for i in batches[j]))
    batches[0], batches[first] = batches[first], batches[0]
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


def expected_padding_share(
    lengths: Sequence[int],
    micro_batch: int,
    tokens_per_batch: int | None,
    group_by_length: bool = True,
    seed: int = 0,
) -> float:
    """Padding share of one epoch: length-grouped under the budget (at most `micro_batch` rows), or, with
    `group_by_length=False`, random batches of `micro_batch` rows (what a plain Trainer does)."""
    lengths = [int(x) for x in lengths]
    if not lengths:
        return 0.0
    if group_by_length:
        budget = tokens_per_batch if tokens_per_batch else micro_batch * max(lengths)
        return padding_share(plan_batches(lengths, budget, micro_batch, seed=seed), lengths)
    idx = list(range(len(lengths)))
    random.Random(seed).shuffle(idx)
    return padding_share([idx[k : k + micro_batch] for k in range(0, len(idx), micro_batch)], lengths)


class TokenBudgetBatchSampler(Sampler[list[int]]):
    """Yields the batches of `plan_batches` (use as `DataLoader(batch_sampler=...)`).

    Epoch `e` uses the plan for seed (seed, e) (`set_epoch`, which the Trainer calls before each epoch), so
    every epoch is a new random grouping; each has the same number of batches as epoch 0, so `len()` (which
    the Trainer uses for steps per epoch and the LR schedule) stays right. Deterministic: a resumed run sees
    the same batches. Not rank-aware: under several processes `accelerate` deals whole batches out to ranks.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        tokens_per_batch: int,
        max_rows: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        megabatch_batches: int = MEGABATCH_BATCHES,
    ) -> None:
        self.lengths = [int(x) for x in lengths]
        self.tokens_per_batch = tokens_per_batch
        self.max_rows = max_rows
        self.seed = seed
        self.shuffle = shuffle
        self.megabatch_batches = megabatch_batches
        self.epoch = 0
        self._cache: tuple[int, list[list[int]]] | None = None
        self._num_batches = len(self._plan(0, None))

    def _plan(self, epoch: int, num_batches: int | None) -> list[list[int]]:
        return plan_batches(
            self.lengths,
            self.tokens_per_batch,
            self.max_rows,
            seed=_derive_seed(self.seed, epoch),
            shuffle=self.shuffle,
            num_batches=num_batches,
            megabatch_batches=self.megabatch_batches,
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def batches(self) -> list[list[int]]:
        """The plan of the current epoch."""
        if self._cache is None or self._cache[0] != self.epoch:
            self._cache = (self.epoch, self._plan(self.epoch, self._num_batches))
        return self._cache[1]

    def __iter__(self) -> Iterator[list[int]]:
        yield from (list(b) for b in self.batches())

    def __len__(self) -> int:
        return self._num_batches


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
    """True where packing through position_ids gives each row the same logits as running it alone.

    Verified (transformers 5.23, CPU, fp32): Llama with eager and sdpa attention (tests) and flex_attention
    (by hand; it compiles, which takes about a minute on CPU). Not equivalent: Bloom and Falcon, whose ALiBi
    models never build a per-row mask from position_ids, so packed rows see the rows before them; they get
    length-grouped padded batches instead. Unverified architectures and attention implementations
    (flash-attention included) report False.
    """
    config = getattr(_base_model(model), "config", None)
    model_type = getattr(config, "model_type", None)
    impl = getattr(config, "_attn_implementation", None)
    return impl in _EXACT_PACKING.get(model_type, frozenset())


# ---- Trainer integration -------------------------------------------------------------------------------------


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


def budget_train_dataloader(
    trainer: Any,
    dataset: Any,
    tokens_per_batch: int,
    max_rows: int | None = None,
    length_column: str = "length",
    collate_fn: Any = None,
    shuffle: bool = True,
) -> DataLoader:
    """The training DataLoader of `trainer` for `dataset` (with a `length` column), batched under a token budget.

    Mirrors `Trainer._get_dataloader`: unused columns removed, the Trainer's dataloader settings and worker
    seeding, then `trainer.accelerator.prepare`. The batch sampler is a `TokenBudgetBatchSampler` seeded with
    `args.data_seed` (else `args.seed`); `len()` of the result is the exact number of micro-batches per epoch,
    from which the Trainer derives steps per epoch and the LR schedule.
    """
    import datasets
    from transformers.trainer_utils import seed_worker

    args = trainer.args
    lengths = _column(dataset, length_column)
    seed = args.data_seed if args.data_seed is not None else args.seed
    sampler = TokenBudgetBatchSampler(lengths, tokens_per_batch, max_rows, seed=seed, shuffle=shuffle)
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


class BudgetTrainer(Trainer):
    """A `transformers.Trainer` whose training batches are length-grouped under a token budget.

    Extra keyword arguments: `tokens_per_batch` (rows x longest row per micro-batch), `max_rows_per_batch`
    (None = no row cap), `packing` (concatenate each batch's rows; only where `supports_exact_packing`),
    `length_column` (default "length"). `per_device_train_batch_size` is not used for training batches;
    `gradient_accumulation_steps` still counts micro-batches per optimizer step. Without a `data_collator`
    it uses `pad_collate` (or `pack_collate`). The loss is a token mean over each optimizer step (see the
    module docstring), also for models whose forward does not take `num_items_in_batch`.
    """

    def __init__(
        self,
        *args: Any,
        tokens_per_batch: int,
        max_rows_per_batch: int | None = None,
        packing: bool = False,
        length_column: str = "length",
        **kwargs: Any,
    ) -> None:
        if tokens_per_batch < 1:
            raise ValueError("tokens_per_batch must be positive")
        self.tokens_per_batch = int(tokens_per_batch)
        self.max_rows_per_batch = max_rows_per_batch
        self.packing = packing
        self.length_column = length_column
        user_collator = kwargs.get("data_collator")
        super().__init__(*args, **kwargs)
        if packing and not supports_exact_packing(self.model):
            raise ValueError(
                "packing=True: packing is not exact for this model/attention implementation; "
                "use length-grouped padded batches (packing=False)"
            )
        if user_collator is None:
            self.data_collator = (
                pack_collate if packing else PadCollator(_pad_id(self.processing_class, self.model))
            )
        if not self.model_accepts_loss_kwargs and self.compute_loss_func is None:
            self.compute_loss_func = token_sum_loss

    def get_train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        return budget_train_dataloader(
            self,
            self.train_dataset,
            self.tokens_per_batch,
            self.max_rows_per_batch,
            length_column=self.length_column,
        )


__all__ = [
    "IGNORE_INDEX",
    "BudgetTrainer",
    "PadCollator",
    "expected_padding_share",
    "TokenBudgetBatchSampler",
    "budget_train_dataloader",
    "pack_collate",
    "pad_collate",
    "padding_share",
    "plan_batches",
    "supports_exact_packing",
    "token_sum_loss",
]
