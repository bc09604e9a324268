"""One Alpaca row as a training example: prompt tokens masked, response + EOS learned.

Layout of one example (`max_length` tokens at most)::

    input_ids = [specials the tokenizer prepends (BOS)] + prompt + response + [EOS]
    labels    = [-100 ...........................................] + response + [EOS]

- The prompt is `prompts.build_prompt(instruction, input)`, tokenized exactly as inference tokenizes it.
- The response is tokenized *in context*, as the tokenizer splits it after the prompt (this matters for
  SentencePiece, whose stand-alone encoding would add a leading word-boundary piece): the prompt's tokens are
  taken off the front of a joint encoding. Where the joint encoding does not start with the prompt's tokens
  (a token merges across the boundary), the response is tokenized on its own instead; such rows are counted
  (`n_boundary_split`). See `_responses_in_context` for how this avoids encoding each prompt twice.
- BOS only where the tokenizer itself adds one (detected, never assumed), and nothing the tokenizer would
  append (some append EOS) — `encode_prompts` gives inference exactly the same prompt ids; the EOS id is
  appended as an id, never as text, and is the last label of every example that is not cut.
- Literal special-token strings inside the data (say a response containing "</s>") are tokenized as text,
  so they can never act as control tokens.

Rows longer than `max_length` (`long_rows`, counted, never silent):

- "cut": the row keeps its whole prompt and the start of its response, *without* EOS (`truncated=True`):
  an EOS after a cut response would teach the model to stop in the middle of an answer;
- "drop": the row is left out (`n_dropped_long`);
- either way, a row whose prompt leaves no room for a response token is dropped (`n_dropped_prompt`):
  cutting the prompt instead would train on a prompt that inference never shows the model.

Held-out splits are tokenized with `long_rows="drop"` and a generous `max_length` (`tokenization.EVAL_MAX_LENGTH`), so
every held-out row is scored whole, with its EOS, and its `response_bytes` (the UTF-8 size of the response
text, for bits per byte) describe exactly the tokens scored.

Padding: labels are built here, so padded positions are excluded by position (the collators in
`pipeline_lib.batching` give them label -100 and attention 0), never by comparing token ids. A pad token
equal to EOS is therefore harmless: the EOS that ends each example stays a learned label.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any, TypedDict

from pipeline_lib.prompts import PROMPT_NO_INPUT, PROMPT_WITH_INPUT, RESPONSE_MARKER, build_prompt

IGNORE_INDEX = -100
TOKENIZATION_VERSION = 2  # bump when the example layout or the truncation policy changes
LONG_ROWS = ("cut", "drop")
_CHECK_ROWS = 64  # rows per call whose response is also encoded after the whole prompt, as a check
_CONTEXT = RESPONSE_MARKER + "\n"  # the tail every prompt ends with


class EncodedExample(TypedDict):
    input_ids: list[int]
    labels: list[int]
    length: int
    truncated: bool
    response_bytes: int


DROPPED_PROMPT = "prompt"  # the prompt alone leaves no room for a response token
DROPPED_LONG = "long"  # longer than max_length under long_rows="drop"


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
    prefix: list[int],
    prompt_ids: list[int],
    response_ids: list[int],
    eos_id: int,
    max_length: int,
    long_rows: str,
    response_bytes: int,
) -> EncodedExample | str:
    """The example, or why it was dropped (`DROPPED_PROMPT` / `DROPPED_LONG`)."""
    head = prefix + prompt_ids
    if len(head) + len(response_ids) + 1 <= max_length:
        input_ids = head + response_ids + [eos_id]
        labels = [IGNORE_INDEX] * len(head) + response_ids + [eos_id]
        return EncodedExample(
            input_ids=input_ids,
            labels=labels,
            length=len(input_ids),
            truncated=False,
            response_bytes=response_bytes,
        )
    if len(head) >= max_length or (not response_ids and len(head) + 1 > max_length):
        return DROPPED_PROMPT
    if long_rows == "drop":
        return DROPPED_LONG
    kept = response_ids[: max_length - len(head)]  # no EOS: the answer does not end here
    return EncodedExample(
        input_ids=head + kept,
        labels=[IGNORE_INDEX] * len(head) + kept,
        length=len(head) + len(kept),
        truncated=True,
        response_bytes=response_bytes,
    )


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


def encode_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Prompt token ids exactly as training lays them out: the tokenizer's own prefix (BOS, if it adds one)
    and the prompt text, nothing appended — a tokenizer that appends EOS would otherwise end every
    inference prompt with "stop"."""
    prefix = special_prefix(tokenizer)
    return [prefix + ids for ids in _encode_texts(tokenizer, list(prompts))]


def encode_batch(
    tokenizer,
    instructions: Sequence[str],
    inputs: Sequence[str],
    outputs: Sequence[str],
    max_length: int,
    long_rows: str = "cut",
) -> tuple[list[EncodedExample | str], int]:
    """Encode many rows with batched tokenizer calls; returns (examples, rows whose response had to be
    tokenized on its own because a token spans the prompt/response boundary).

    An entry is a string where the row was dropped: `DROPPED_PROMPT` or `DROPPED_LONG` (see the module
    docstring for `long_rows`).
    """
    if max_length < 2:
        raise ValueError("max_length must leave room for at least one token and EOS")
    if long_rows not in LONG_ROWS:
        raise ValueError(f"long_rows must be one of {LONG_ROWS}, got {long_rows!r}")
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError("the tokenizer has no EOS token")
    prefix = special_prefix(tokenizer)
    prompts = [build_prompt(i, x or "") for i, x in zip(instructions, inputs, strict=True)]
    prompt_ids = _encode_texts(tokenizer, prompts)
    responses, n_split = _responses_in_context(tokenizer, prompts, prompt_ids, outputs)
    examples = [
        _assemble(prefix, p, r, eos_id, max_length, long_rows, len(o.encode("utf-8")))
        for p, r, o in zip(prompt_ids, responses, outputs, strict=True)
    ]
    return examples, n_split


def encode_example(
    tokenizer, instruction: str, input: str, output: str, max_length: int, long_rows: str = "cut"
) -> EncodedExample | None:
    """One row as `{input_ids, labels, length, truncated, response_bytes}`; None when the row is dropped.

    Prompt positions (and the BOS the tokenizer prepends, if any) have label -100; the response tokens and the
    final EOS id are labels. See the module docstring for rows longer than `max_length`.
    """
    examples, _ = encode_batch(tokenizer, [instruction], [input], [output], max_length, long_rows)
    return examples[0] if not isinstance(examples[0], str) else None
