"""Turn Alpaca rows into training examples: prompt tokens masked, response + EOS learned.

Layout of one example (`max_length` tokens at most)::

    input_ids = [specials the tokenizer prepends (BOS)] + prompt + response + [EOS]
    labels    = [-100 ...........................................] + response + [EOS]

- The prompt is `prompts.build_prompt(instruction, input)`, tokenized exactly as inference tokenizes it.
- The response is tokenized *in context*, as the tokenizer splits it after the prompt (this matters for
  SentencePiece, whose stand-alone encoding would add a leading word-boundary piece): the prompt's tokens are
  taken off the front of a joint encoding. Where the joint encoding does not start with the prompt's tokens
  (a token merges across the boundary), the response is tokenized on its own instead; such rows are counted
  (`n_boundary_split`). See `_responses_in_context` for how this avoids encoding each prompt twice.
- BOS only where the tokenizer itself adds one (detected, never assumed); the EOS id is appended as an id,
  never as text, and is the last label of every example, truncated or not.
- Literal special-token strings inside the data (say a response containing "</s>") are tokenized as text,
  so they can never act as control tokens.

Truncation policy (counted, never silent):

- a row longer than `max_length` keeps its whole prompt and a truncated response, and still ends with EOS
  (`truncated=True`);
- a row whose prompt leaves no room for at least one response token plus EOS is dropped (`encode_example`
  returns None, `tokenize_split` counts it in `n_dropped`): cutting the prompt instead would train on a prompt
  that inference never shows the model.

Padding: labels are built here, so padded positions are excluded by position (the collators in
`pipeline_lib.batching` give them label -100 and attention 0), never by comparing token ids. A pad token
equal to EOS is therefore harmless: the EOS that ends each example stays a learned label.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from itertools import chain
from pathlib import Path
from typing import Any, TypedDict

from pipeline_lib.prompts import PROMPT_NO_INPUT, PROMPT_WITH_INPUT, RESPONSE_MARKER, build_prompt

IGNORE_INDEX = -100
TOKENIZATION_VERSION = 1  # bump when the example layout or the truncation policy changes
STATS_FILE = "qabot_tokenized.json"
_CHUNK_ROWS = 2048  # rows per batched tokenizer call
_CHECK_ROWS = 64  # rows per call whose response is also encoded after the whole prompt, as a check
_CONTEXT = RESPONSE_MARKER + "\n"  # the tail every prompt ends with

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


class EncodedExample(TypedDict):
    input_ids: list[int]
    labels: list[int]
    length: int
    truncated: bool


def template_version() -> str:
    """Short hash of the prompt templates: any change to them changes every tokenized fingerprint."""
    blob = json.dumps([PROMPT_WITH_INPUT, PROMPT_NO_INPUT, TOKENIZATION_VERSION]).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def load_tokenizer(path_or_id: str | os.PathLike, use_fast: bool | None = None, revision: str | None = None):
    """Load a tokenizer ready for training, without changing its vocabulary.

    - A missing pad token is set to an existing token: UNK when the tokenizer has one, else EOS. No token is
      added, so the embedding matrix never needs resizing. Pad equal to EOS is safe here because padded
      positions are masked by position (see the module docstring).
    - `padding_side="right"`: positions 0..n-1 of every row are the same as when it is alone.
    """
    from transformers import AutoTokenizer

    kwargs: dict[str, Any] = {}
    if use_fast is not None:
        kwargs["use_fast"] = use_fast
    if revision is not None:
        kwargs["revision"] = revision
    tokenizer = AutoTokenizer.from_pretrained(str(path_or_id), **kwargs)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{path_or_id}: the tokenizer has no EOS token; cannot mark the end of responses")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = (
            tokenizer.unk_token if tokenizer.unk_token_id is not None else tokenizer.eos_token
        )
    tokenizer.padding_side = "right"
    return tokenizer


def special_prefix(tokenizer) -> list[int]:
    """The special-token ids the tokenizer puts in front of a text (e.g. `[bos_id]` for Llama, `[]` for Bloom)."""
    probe = "probe text"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start])
    return []


def _encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Batched encoding of plain text: no special tokens added, special-token strings kept as text."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is not None and hasattr(backend, "encode_special_tokens"):
        # The Rust tokenizer directly: one parallel call, no Python-side BatchEncoding.
        previous = backend.encode_special_tokens
        backend.encode_special_tokens = True
        try:
            return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
        finally:
            backend.encode_special_tokens = previous
    kwargs: dict[str, Any] = dict(add_special_tokens=False, return_attention_mask=False)
    try:
        out = tokenizer(texts, split_special_tokens=True, **kwargs)
    except TypeError:  # pragma: no cover - tokenizers without split_special_tokens
        out = tokenizer(texts, **kwargs)
    return [list(ids) for ids in out["input_ids"]]


def _strip_prefix(prefixes: list[list[int]], joint: list[list[int]]) -> list[list[int] | None]:
    """`joint[k]` without `prefixes[k]` in front; None where `joint[k]` does not start with it."""
    return [j[len(p) :] if j[: len(p)] == p else None for p, j in zip(prefixes, joint, strict=True)]


def _assemble(
    prefix: list[int], prompt_ids: list[int], response_ids: list[int], eos_id: int, max_length: int
) -> EncodedExample | None:
    head = prefix + prompt_ids
    room = max_length - len(head) - 1  # response tokens that fit before the EOS
    if room < min(1, len(response_ids)):
        return None  # the prompt alone leaves no room for a response: dropped
    truncated = len(response_ids) > room
    if truncated:
        response_ids = response_ids[:room]
    input_ids = head + response_ids + [eos_id]
    labels = [IGNORE_INDEX] * len(head) + response_ids + [eos_id]
    return EncodedExample(input_ids=input_ids, labels=labels, length=len(input_ids), truncated=truncated)


def _responses_in_context(tokenizer, prompts: list[str], prompt_ids: list[list[int]], outputs: Sequence[str]):
    """Response token ids as the tokenizer splits them after the prompt; (responses, rows with a split boundary).

    Tokenizing every `prompt + output` would encode each prompt twice. Every prompt ends with
    `_CONTEXT` ("### Response:\n"), and the pieces after it depend only on that tail for the tokenizers in use
    (regex pre-tokenizers such as GPT-2/Bloom/Falcon byte-level BPE start a new piece after the newline;
    SentencePiece words start at the space before "Response:"), so `_CONTEXT + output` is encoded instead.
    The first `_CHECK_ROWS` rows of every call are also encoded as `prompt + output`; a single disagreement
    switches the whole call to whole-prompt encoding, so an unusual tokenizer costs time, never correctness.
    """
    n = len(prompts)
    short_ok = all(p.endswith(_CONTEXT) for p in prompts)
    responses: list[list[int] | None] = [None] * n
    if short_ok:
        ctx = _encode_texts(tokenizer, [_CONTEXT])[0]
        joint = _encode_texts(tokenizer, [_CONTEXT + o for o in outputs])
        responses = _strip_prefix([ctx] * n, joint)
        k = min(n, _CHECK_ROWS)
        full_check = _strip_prefix(
            prompt_ids[:k],
            _encode_texts(tokenizer, [p + o for p, o in zip(prompts[:k], outputs[:k], strict=True)]),
        )
        short_ok = full_check == responses[:k]
    if not short_ok:
        responses = _strip_prefix(
            prompt_ids, _encode_texts(tokenizer, [p + o for p, o in zip(prompts, outputs, strict=True)])
        )
    split_rows = [k for k, r in enumerate(responses) if r is None]
    if split_rows:  # a token spans the prompt/response boundary: encode the response on its own
        alone = _encode_texts(tokenizer, [outputs[k] for k in split_rows])
        for k, ids in zip(split_rows, alone, strict=True):
            responses[k] = ids
    return responses, len(split_rows)


def encode_batch(
    tokenizer,
    instructions: Sequence[str],
    inputs: Sequence[str],
    outputs: Sequence[str],
    max_length: int,
) -> tuple[list[EncodedExample | None], int]:
    """Encode many rows with batched tokenizer calls; returns (examples, rows whose response had to be
    tokenized on its own because a token spans the prompt/response boundary).

    An entry is None where the row was dropped (prompt too long, see the module docstring).
    """
    if max_length < 2:
        raise ValueError("max_length must leave room for at least one token and EOS")
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError("the tokenizer has no EOS token")
    prefix = special_prefix(tokenizer)
    prompts = [build_prompt(i, x or "") for i, x in zip(instructions, inputs, strict=True)]
    prompt_ids = _encode_texts(tokenizer, prompts)
    responses, n_split = _responses_in_context(tokenizer, prompts, prompt_ids, outputs)
    examples = [
        _assemble(prefix, p, r, eos_id, max_length) for p, r in zip(prompt_ids, responses, strict=True)
    ]
    return examples, n_split


def encode_example(
    tokenizer, instruction: str, input: str, output: str, max_length: int
) -> EncodedExample | None:
    """One row as `{input_ids, labels, length, truncated}`; None when the row is dropped (prompt too long).

    Prompt positions (and the BOS the tokenizer prepends, if any) have label -100; the response tokens and the
    final EOS id are labels. See the module docstring for the truncation policy.
    """
    examples, _ = encode_batch(tokenizer, [instruction], [input], [output], max_length)
    return examples[0]


# ---- whole splits --------------------------------------------------------------------------------------------


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
) -> str:
    """Identity of a tokenized split: input file, tokenizer files, max_length, template and layout version."""
    parts = {
        "data": file_sha256(jsonl_path),
        "tokenizer": tokenizer_fingerprint(tokenizer_dir, use_fast),
        "max_length": max_length,
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


def _worker_encode(args: tuple[list[str], list[str], list[str], int]):
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
) -> dict[str, Any]:
    """Tokenize a clean Alpaca JSONL split into a `datasets.Dataset` saved at `out_dir`; return its stats.

    Columns: input_ids, labels (prompt = -100), length. The stats (JSON-able, also written to
    `out_dir/qabot_tokenized.json`): path, fingerprint, n_input_rows, n_rows (= n_input_rows - n_dropped),
    n_truncated (rows kept with a cut response), n_dropped, n_boundary_split, length_stats {mean, median, p90,
    p99, max} (also under `lengths`), padding_free_tokens (sum of lengths), label_tokens, seconds, reused.
    When `out_dir` already holds a split with the same fingerprint, it is reused as it is.

    Batched tokenizer calls do the work (a fast tokenizer spreads each call over all cores); `num_proc > 1`
    splits the rows over that many spawned worker processes instead, which only helps slow (Python)
    tokenizers (the calling script needs the usual `if __name__ == "__main__":` guard).
    """
    started = time.perf_counter()
    out = Path(out_dir)
    fp = split_fingerprint(jsonl_path, tokenizer_dir, max_length, use_fast)
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
    examples: list[EncodedExample | None] = []
    n_split = 0
    if num_proc and num_proc > 1 and n > _CHUNK_ROWS:
        import multiprocessing as mp

        jobs = [
            (instructions[a:b], inputs[a:b], outputs[a:b], max_length)
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
            part, k = encode_batch(tokenizer, instructions[a:b], inputs[a:b], outputs[a:b], max_length)
            examples.extend(part)
            n_split += k

    kept = [e for e in examples if e is not None]
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
        "n_boundary_split": n_split,
        "length_stats": _length_stats(lengths),
        "padding_free_tokens": int(sum(lengths)),
    }
    stats["lengths"] = stats["length_stats"]  # alias
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
) -> dict[str, Any]:
    """Tokenize the train and eval splits of a prepared data set (`PreparedData.to_dict()`) into
    `out_dir/train` and `out_dir/eval`; return {train, eval (the `tokenize_split` stats), fingerprint,
    data_fingerprint, base_model, max_length}."""
    out = Path(out_dir)
    splits = {
        name: tokenize_split(
            prepared[f"{name}_path"],
            tokenizer_dir,
            max_length,
            out / name,
            use_fast=use_fast,
            num_proc=num_proc,
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
    }


def load_tokenized(path: str | os.PathLike):
    """The dataset written by `tokenize_split`."""
    from datasets import load_from_disk

    return load_from_disk(str(path))
