"""Tokenized splits: a clean Alpaca JSONL split encoded with one model's tokenizer into a saved `datasets`
dataset with its statistics, fingerprinted by data, tokenizer, length and layout; and the tokenize stage,
`tokenize_stage(job) -> TokenizedData`, which does that for the train and held-out splits.

How one row becomes an example (prompt masked, EOS, long rows) is `pipeline_lib.encoding`. The held-out
split is tokenized with `long_rows="drop"` and a generous `max_length` (`EVAL_MAX_LENGTH`), so every held-out
row is scored whole, with its EOS, and its `response_bytes` describe exactly the tokens scored.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from itertools import chain
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from pipeline_lib.contracts import ResolvedModel, TokenizedData, TokenizedSplit
from pipeline_lib.encoding import (
    DROPPED_LONG,
    DROPPED_PROMPT,
    IGNORE_INDEX,
    LONG_ROWS,
    EncodedExample,
    encode_batch,
    encode_example,
    encode_prompts,
    load_tokenizer,
    special_prefix,
    template_version,
)
from pipeline_lib.files import file_sha256

__all__ = [  # the encoding names are re-exported for callers that tokenize splits and rows alike
    "DROPPED_LONG",
    "DROPPED_PROMPT",
    "EVAL_MAX_LENGTH",
    "IGNORE_INDEX",
    "LONG_ROWS",
    "STATS_FILE",
    "EncodedExample",
    "TokenizeJob",
    "encode_batch",
    "encode_example",
    "encode_prompts",
    "load_tokenized",
    "load_tokenizer",
    "special_prefix",
    "split_fingerprint",
    "template_version",
    "tokenize_prepared",
    "tokenize_split",
    "tokenize_stage",
    "tokenizer_fingerprint",
]

STATS_FILE = "qabot_tokenized.json"
_CHUNK_ROWS = 2048  # rows per batched tokenizer call
EVAL_MAX_LENGTH = 2048  # held-out rows longer than this (tokens) are dropped, never cut

# Files that define a tokenizer (hashed for the fingerprint); model weights are deliberately left out.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
)


# ---- whole splits --------------------------------------------------------------------------------------------


def tokenizer_fingerprint(tokenizer_dir: str | os.PathLike, use_fast: bool | None = None) -> str:
    """sha256 over the files that define a tokenizer in a local directory (weights excluded)."""
    root = Path(tokenizer_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: tokenizer directory not found")
    h = hashlib.sha256(json.dumps({"use_fast": use_fast}).encode())
    found = False
    for name in _TOKENIZER_FILES:
        f = root / name
        if f.is_file():
            found = True
            h.update(name.encode())
            h.update(f.read_bytes())
    if not found:
        raise FileNotFoundError(f"{root}: no tokenizer files ({', '.join(_TOKENIZER_FILES[:3])}, ...)")
    return h.hexdigest()[:16]


def split_fingerprint(
    jsonl_path: str | os.PathLike,
    tokenizer_dir: str | os.PathLike,
    max_length: int,
    use_fast: bool | None = None,
    long_rows: str = "cut",
) -> str:
    """Identity of a tokenized split: input file, tokenizer files, max_length, long-row policy, template and
    layout version."""
    parts = {
        "data": file_sha256(jsonl_path),
        "tokenizer": tokenizer_fingerprint(tokenizer_dir, use_fast),
        "max_length": max_length,
        "long_rows": long_rows,
        "template": template_version(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def read_jsonl_rows(path: str | os.PathLike) -> tuple[list[str], list[str], list[str]]:
    """Columns (instructions, inputs, outputs) of an Alpaca JSONL file; a missing input counts as ''."""
    instructions: list[str] = []
    inputs: list[str] = []
    outputs: list[str] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                instructions.append(str(row["instruction"]))
                inputs.append(str(row.get("input") or ""))
                outputs.append(str(row["output"]))
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{path}:{lineno}: not an Alpaca row ({err})") from None
    return instructions, inputs, outputs


def _chunks(n: int, size: int) -> Iterable[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(n, start + size)


_WORKER_TOKENIZER = None


def _worker_init(tokenizer_dir: str, use_fast: bool | None) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = load_tokenizer(tokenizer_dir, use_fast=use_fast)


def _worker_encode(args: tuple[list[str], list[str], list[str], int, str]):
    return encode_batch(_WORKER_TOKENIZER, *args)


def _length_stats(lengths: list[int]) -> dict[str, float]:
    import numpy as np

    if not lengths:
        return {"mean": 0.0, "median": 0.0, "p90": 0.0, "p99": 0.0, "max": 0}
    a = np.asarray(lengths)
    return {
        "mean": round(float(a.mean()), 2),
        "median": float(np.median(a)),
        "p90": float(np.percentile(a, 90)),
        "p99": float(np.percentile(a, 99)),
        "max": int(a.max()),
    }


def _to_dataset(examples: list[EncodedExample]) -> tuple[Any, int]:
    """(a `datasets.Dataset` with input_ids, labels: int32 lists and length: int32, number of label tokens).

    Built from flat Arrow arrays, which is several times faster than converting Python lists row by row.
    """
    import numpy as np
    import pyarrow as pa
    from datasets import Dataset

    lengths = np.fromiter((e["length"] for e in examples), dtype=np.int32, count=len(examples))
    response_bytes = np.fromiter((e["response_bytes"] for e in examples), dtype=np.int64, count=len(examples))
    offsets = np.zeros(len(examples) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    total = int(offsets[-1])
    ids = np.fromiter(chain.from_iterable(e["input_ids"] for e in examples), dtype=np.int32, count=total)
    labels = np.fromiter(chain.from_iterable(e["labels"] for e in examples), dtype=np.int32, count=total)
    off = pa.array(offsets, type=pa.int32())
    table = pa.table(
        {
            "input_ids": pa.ListArray.from_arrays(off, pa.array(ids)),
            "labels": pa.ListArray.from_arrays(off, pa.array(labels)),
            "length": pa.array(lengths),
            "response_bytes": pa.array(response_bytes),
        }
    )
    return Dataset(table), int((labels != IGNORE_INDEX).sum())


def tokenize_split(
    jsonl_path: str | os.PathLike,
    tokenizer_dir: str | os.PathLike,
    max_length: int,
    out_dir: str | os.PathLike,
    use_fast: bool | None = None,
    num_proc: int | None = None,
    long_rows: str = "cut",
) -> dict[str, Any]:
    """Tokenize a clean Alpaca JSONL split into a `datasets.Dataset` saved at `out_dir`; return its stats.

    Columns: input_ids, labels (prompt = -100), length, response_bytes. The stats (JSON-able, also written to
    `out_dir/qabot_tokenized.json`): path, fingerprint, n_input_rows, n_rows (= n_input_rows - n_dropped),
    n_truncated (rows kept with a cut response, no EOS), n_dropped (= n_dropped_prompt + n_dropped_long),
    n_boundary_split, long_rows, length_stats {mean, median, p90, p99, max},
    padding_free_tokens (sum of lengths), label_tokens, response_bytes, seconds, reused.
    When `out_dir` already holds a split with the same fingerprint, it is reused as it is.

    Batched tokenizer calls do the work (a fast tokenizer spreads each call over all cores); `num_proc > 1`
    splits the rows over that many spawned worker processes instead, which only helps slow (Python)
    tokenizers (the calling script needs the usual `if __name__ == "__main__":` guard).
    """
    started = time.perf_counter()
    out = Path(out_dir)
    fp = split_fingerprint(jsonl_path, tokenizer_dir, max_length, use_fast, long_rows)
    stats_path = out / STATS_FILE
    if stats_path.is_file() and (out / "state.json").is_file():
        try:
            previous = json.loads(stats_path.read_text())
        except json.JSONDecodeError:
            previous = {}
        if previous.get("fingerprint") == fp:
            return {**previous, "reused": True}

    instructions, inputs, outputs = read_jsonl_rows(jsonl_path)
    n = len(instructions)
    examples: list[EncodedExample | str] = []
    n_split = 0
    if num_proc and num_proc > 1 and n > _CHUNK_ROWS:
        import multiprocessing as mp

        jobs = [
            (instructions[a:b], inputs[a:b], outputs[a:b], max_length, long_rows)
            for a, b in _chunks(n, max(_CHUNK_ROWS, -(-n // (num_proc * 4))))
        ]
        with ProcessPoolExecutor(
            num_proc,
            mp_context=mp.get_context("spawn"),
            initializer=_worker_init,
            initargs=(str(tokenizer_dir), use_fast),
        ) as pool:
            for part, k in pool.map(_worker_encode, jobs):
                examples.extend(part)
                n_split += k
    else:
        tokenizer = load_tokenizer(tokenizer_dir, use_fast=use_fast)
        for a, b in _chunks(n, _CHUNK_ROWS):
            part, k = encode_batch(
                tokenizer, instructions[a:b], inputs[a:b], outputs[a:b], max_length, long_rows
            )
            examples.extend(part)
            n_split += k

    kept = [e for e in examples if not isinstance(e, str)]
    lengths = [e["length"] for e in kept]
    stats: dict[str, Any] = {
        "path": str(out),
        "fingerprint": fp,
        "source": str(jsonl_path),
        "tokenizer": str(tokenizer_dir),
        "max_length": max_length,
        "template_version": template_version(),
        "n_input_rows": n,
        "n_rows": len(kept),
        "n_truncated": sum(e["truncated"] for e in kept),
        "n_dropped": n - len(kept),
        "n_dropped_prompt": sum(e == DROPPED_PROMPT for e in examples),
        "n_dropped_long": sum(e == DROPPED_LONG for e in examples),
        "long_rows": long_rows,
        "n_boundary_split": n_split,
        "length_stats": _length_stats(lengths),
        "padding_free_tokens": int(sum(lengths)),
        "response_bytes": int(sum(e["response_bytes"] for e in kept)),
    }
    dataset, stats["label_tokens"] = _to_dataset(kept)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    dataset.save_to_disk(str(tmp))
    stats["seconds"] = round(time.perf_counter() - started, 3)
    stats["reused"] = False
    (tmp / STATS_FILE).write_text(json.dumps(stats, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return stats


def tokenize_prepared(
    prepared: dict[str, Any],
    tokenizer_dir: str | os.PathLike,
    max_length: int,
    out_dir: str | os.PathLike,
    use_fast: bool | None = None,
    base_model: str | None = None,
    num_proc: int | None = None,
    long_rows: str = "cut",
    eval_max_length: int | None = None,
) -> dict[str, Any]:
    """Tokenize the train and eval splits of a prepared data set (`PreparedData.to_dict()`) into
    `out_dir/train` and `out_dir/eval`; return {train, eval (the `tokenize_split` stats), fingerprint,
    data_fingerprint, base_model, max_length}.

    The train split follows `max_length` and `long_rows`; the eval split is scored whole: `long_rows="drop"`
    at `eval_max_length` (default: the larger of `max_length` and `EVAL_MAX_LENGTH`)."""
    out = Path(out_dir)
    eval_len = eval_max_length or max(max_length, EVAL_MAX_LENGTH)
    settings = {"train": (max_length, long_rows), "eval": (eval_len, "drop")}
    splits = {
        name: tokenize_split(
            prepared[f"{name}_path"],
            tokenizer_dir,
            settings[name][0],
            out / name,
            use_fast=use_fast,
            num_proc=num_proc,
            long_rows=settings[name][1],
        )
        for name in ("train", "eval")
    }
    fp = hashlib.sha256(
        json.dumps([splits["train"]["fingerprint"], splits["eval"]["fingerprint"]]).encode()
    ).hexdigest()[:16]
    return {
        **splits,
        "fingerprint": fp,
        "data_fingerprint": prepared.get("fingerprint"),
        "base_model": base_model,
        "max_length": max_length,
        "eval_max_length": eval_len,
        "long_rows": long_rows,
    }


def load_tokenized(path: str | os.PathLike):
    """The dataset written by `tokenize_split`."""
    from datasets import load_from_disk

    return load_from_disk(str(path))


# ---- the stage ---------------------------------------------------------------------------------------------


class TokenizeJob(BaseModel):
    """The tokenize stage's input: a prepared data set, the model whose tokenizer to use, and the layout."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    train_path: str
    eval_path: str
    data_fingerprint: str
    model: ResolvedModel
    max_length: int
    use_fast: bool | None = None
    long_rows: str = "cut"
    out_dir: str


class TooFewRowsError(ValueError):
    """`max_length` leaves too few training rows room for an answer; one line with what fits and what would."""


_ROOM_SAMPLE = 2000  # rows measured whole to suggest a max_length (only when the check fails)


def check_room(job: TokenizeJob, train: TokenizedSplit) -> None:
    """Stop when `max_length` fits no training row, or when most rows' prompts alone do not fit (they are
    dropped whatever `long_rows` says): training would fail on an empty set or learn from a sliver of it.
    The message says how many rows fit and the max_length at which half the rows fit whole."""
    n = train.n_input_rows
    if n == 0 or (train.n_rows > 0 and 2 * train.n_dropped_prompt <= n):
        return
    instructions, inputs, outputs = (c[:_ROOM_SAMPLE] for c in read_jsonl_rows(job.train_path))
    tokenizer = load_tokenizer(job.model.path, use_fast=job.use_fast)
    whole, _ = encode_batch(tokenizer, instructions, inputs, outputs, EVAL_MAX_LENGTH, "drop")
    lengths = sorted(EVAL_MAX_LENGTH + 1 if isinstance(e, str) else e["length"] for e in whole)
    median = lengths[(len(lengths) - 1) // 2]
    suggest = max(64, -(-median // 8) * 8)
    raise TooFewRowsError(
        f"{job.model.name}: max_length {job.max_length} leaves room for an answer in {train.n_rows} of {n} "
        f"training rows (in {train.n_dropped_prompt} the prompt alone is longer); set the model's max_length "
        f"to at least {suggest}, where half the rows fit whole"
    )


def tokenize_stage(job: TokenizeJob) -> TokenizedData:
    """Tokenize the train and eval splits with the model's tokenizer (`tokenize_prepared`); `TooFewRowsError`
    when `max_length` leaves too few training rows room for an answer (`check_room`)."""
    prepared = {"train_path": job.train_path, "eval_path": job.eval_path, "fingerprint": job.data_fingerprint}
    result = tokenize_prepared(
        prepared,
        job.model.path,
        job.max_length,
        job.out_dir,
        use_fast=job.use_fast,
        base_model=job.model.base_model,
        long_rows=job.long_rows,
    )
    data = TokenizedData.model_validate(result)
    check_room(job, data.train)
    return data
