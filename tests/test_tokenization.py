"""Training examples from Alpaca rows, for the tiny Llama (BOS, no pad), Bloom (pad, no BOS) and Falcon
(BOS = EOS = UNK, no pad) tokenizers: masking, EOS, truncation and whole-split tokenization."""

from __future__ import annotations

import json

import pytest

from pipeline_lib.architectures import ARCHS  # noqa: E402  (every family in the registry)
from pipeline_lib.prompts import build_prompt
from pipeline_lib.synthetic import alpaca_rows, write_jsonl
from pipeline_lib.tokenization import (
    IGNORE_INDEX,
    STATS_FILE,
    encode_batch,
    encode_example,
    load_tokenized,
    load_tokenizer,
    special_prefix,
    tokenize_split,
)

ROWS = [  # (instruction, input, output)
    ("What is the capital city of France?", "", "The capital city of France is Paris."),
    ("Classify the sentiment of the sentence.", "The service was excellent.", "positive"),
    ("Traduce la frase al español.", "Good morning, friend.", "¡Buenos días, amigo! ¿Qué tal?"),
    ("日本の首都はどこですか？", "", "東京は日本の首都です。"),
    ("Переведи на русский.", "The capital of Russia is Moscow.", "Столица России — Москва."),
    (
        "Write a Python function that sums two vectors.",
        "",
        "def add(a, b):\n    return [x + y for x, y in zip(a, b)]",
    ),
]


@pytest.fixture(scope="module")
def toks(tiny_models):
    return {arch: load_tokenizer(tiny_models[arch]) for arch in ARCHS}


def _unmasked(ex) -> list[int]:
    return [t for t in ex["labels"] if t != IGNORE_INDEX]


def _n_masked(ex) -> int:
    labels = ex["labels"]
    n = 0
    while n < len(labels) and labels[n] == IGNORE_INDEX:
        n += 1
    return n


@pytest.mark.parametrize("arch", ARCHS)
def test_load_tokenizer_sets_pad_without_new_tokens(arch, tiny_models, toks):
    from transformers import AutoTokenizer

    raw = AutoTokenizer.from_pretrained(tiny_models[arch])
    tok = toks[arch]
    assert len(tok) == len(raw)  # vocabulary unchanged: no embedding resize
    assert tok.pad_token_id is not None and tok.padding_side == "right"
    expected_pad = {"llama": "<unk>", "bloom": "<pad>", "falcon": "<|endoftext|>"}[arch]
    assert tok.pad_token == expected_pad
    assert special_prefix(tok) == ([tok.bos_token_id] if arch == "llama" else [])


def _expected(tok, instruction: str, input_: str, output: str) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) straight from the tokenizer's own API, independently of qabot's code:
    the prompt with the tokenizer's specials (BOS for Llama), the response as the tokenizer splits it after
    the prompt (the tiny tokenizers start a new piece after the prompt's final newline)."""
    prompt = build_prompt(instruction, input_)
    prompt_ids = tok(prompt)["input_ids"]
    joint = tok(prompt + output)["input_ids"]
    assert joint[: len(prompt_ids)] == prompt_ids
    return prompt_ids, joint[len(prompt_ids) :]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("row", ROWS, ids=[f"row{k}" for k in range(len(ROWS))])
def test_prompt_masked_response_and_eos_learned(arch, row, toks):
    tok = toks[arch]
    prompt_ids, response_ids = _expected(tok, *row)
    ex = encode_example(tok, *row, max_length=512)
    assert ex["input_ids"] == prompt_ids + response_ids + [tok.eos_token_id]
    assert ex["labels"] == [IGNORE_INDEX] * len(prompt_ids) + response_ids + [tok.eos_token_id]
    assert ex["length"] == len(ex["input_ids"]) and not ex["truncated"]
    assert ex["response_bytes"] == len(row[2].encode("utf-8"))
    assert tok.decode(_unmasked(ex)) == row[2] + tok.eos_token
    assert ex["input_ids"].count(tok.eos_token_id) == 1  # falcon: BOS = EOS, yet no BOS is prepended
    assert (ex["input_ids"][0] == tok.bos_token_id) == (arch == "llama")


@pytest.mark.parametrize("arch", ARCHS)
def test_with_and_without_input_use_their_templates(arch, toks):
    tok = toks[arch]
    with_input = encode_example(tok, "Summarize.", "A long text.", "Short.", 512)
    without = encode_example(tok, "Summarize.", "", "Short.", 512)
    assert "### Input:" in tok.decode(with_input["input_ids"])
    assert "### Input:" not in tok.decode(without["input_ids"])
    assert _unmasked(with_input) == _unmasked(without)


@pytest.mark.parametrize("arch", ARCHS)
def test_long_rows_are_cut_without_eos_or_dropped(arch, toks):
    tok = toks[arch]
    row = ("Tell me about Paris.", "", "The capital city of France is Paris. " * 10)
    prompt_ids, response_ids = _expected(tok, *row)
    whole = len(prompt_ids) + len(response_ids) + 1
    # Fits exactly: whole, with EOS.
    fits = encode_example(tok, *row, max_length=whole)
    assert not fits["truncated"] and fits["input_ids"] == prompt_ids + response_ids + [tok.eos_token_id]
    # One token short: the response fits but its EOS does not -> cut, no EOS.
    for max_length in (whole - 1, len(prompt_ids) + 9):
        cut = encode_example(tok, *row, max_length=max_length)
        kept = response_ids[: max_length - len(prompt_ids)]
        assert cut["truncated"] and cut["length"] == max_length
        assert cut["input_ids"] == prompt_ids + kept
        assert cut["labels"] == [IGNORE_INDEX] * len(prompt_ids) + kept
        assert tok.eos_token_id not in cut["labels"]
        # long_rows="drop": left out instead.
        assert encode_example(tok, *row, max_length=max_length, long_rows="drop") is None
    assert encode_example(tok, *row, max_length=whole, long_rows="drop") == fits


@pytest.mark.parametrize("arch", ARCHS)
def test_prompt_too_long_is_dropped(arch, toks):
    tok = toks[arch]
    long_input = "word " * 200
    assert encode_example(tok, "Summarize.", long_input, "Short.", 64) is None
    prompt_ids, response_ids = _expected(tok, "Summarize.", "", "Short answer here.")
    # Room for exactly one response token: kept, cut after it.
    ex = encode_example(tok, "Summarize.", "", "Short answer here.", len(prompt_ids) + 1)
    assert ex is not None and ex["truncated"] and _unmasked(ex) == response_ids[:1]
    assert encode_example(tok, "Summarize.", "", "Short answer here.", len(prompt_ids)) is None


@pytest.mark.parametrize("arch", ARCHS)
def test_special_token_text_in_data_stays_text(arch, toks):
    tok = toks[arch]
    output = f"Use {tok.eos_token} to end, or {tok.bos_token}."
    ex = encode_example(tok, "How do documents end?", "", output, 512)
    assert ex["input_ids"].count(tok.eos_token_id) == 1 and ex["labels"][-1] == tok.eos_token_id
    assert tok.decode(_unmasked(ex)[:-1]) == output


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_encoding_equals_the_tokenizers_own_encoding(arch, toks):
    tok = toks[arch]
    ins, inp, out = zip(*ROWS, strict=True)
    batch, n_split = encode_batch(tok, list(ins), list(inp), list(out), 512)
    assert n_split == 0
    for ex, row in zip(batch, ROWS, strict=True):
        prompt_ids, response_ids = _expected(tok, *row)
        assert ex["input_ids"] == prompt_ids + response_ids + [tok.eos_token_id]


def _eos_appending(path, tmp_path):
    """The tiny Llama tokenizer, changed to append EOS when encoding (as some real tokenizers do)."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    bos, eos = tok.bos_token, tok.eos_token
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, tok.bos_token_id), (eos, tok.eos_token_id)]
    )
    tok.save_pretrained(tmp_path / "eos-tok")
    tok = load_tokenizer(tmp_path / "eos-tok")
    assert tok("Hi")["input_ids"][-1] == tok.eos_token_id  # it really appends EOS
    return tok


def test_a_tokenizer_that_appends_eos_ends_no_prompt_with_eos(tiny_models, tmp_path):
    from pipeline_lib.tokenization import encode_prompts

    tok = _eos_appending(tiny_models["llama"], tmp_path)
    prompt = build_prompt("What is the capital city of France?")
    (prompt_ids,) = encode_prompts(tok, [prompt])
    assert prompt_ids[-1] != tok.eos_token_id and prompt_ids[0] == tok.bos_token_id
    assert prompt_ids == tok(prompt)["input_ids"][:-1]
    ex = encode_example(tok, "What is the capital city of France?", "", "Paris.", 512)
    assert ex["input_ids"][: len(prompt_ids)] == prompt_ids  # training saw exactly the inference prompt
    assert ex["input_ids"].count(tok.eos_token_id) == 1 and ex["labels"][-1] == tok.eos_token_id


@pytest.mark.parametrize("arch", ARCHS)
def test_tokenize_split_writes_dataset_and_stats(arch, tiny_models, toks, tmp_path):
    tok = toks[arch]
    rows = alpaca_rows(300, seed=3)
    rows += [{"instruction": i, "input": x, "output": o} for i, x, o in ROWS]
    rows.append({"instruction": "Summarize.", "input": "word " * 300, "output": "Too long to keep."})
    rows.append({"instruction": "Explain.", "input": "", "output": "A long answer. " * 60})
    src = write_jsonl(rows, tmp_path / "train.jsonl")
    max_length = 112
    stats = tokenize_split(src, tiny_models[arch], max_length, tmp_path / "tok")

    ds = load_tokenized(stats["path"])
    assert ds.column_names == ["input_ids", "labels", "length", "response_bytes"]
    assert stats["n_input_rows"] == len(rows)
    expected, n_long, n_prompt = [], 0, 0
    for r in rows:
        prompt_ids, response_ids = _expected(tok, r["instruction"], r["input"], r["output"])
        if len(prompt_ids) >= max_length:
            n_prompt += 1
        elif len(prompt_ids) + len(response_ids) + 1 <= max_length:
            expected.append((prompt_ids + response_ids + [tok.eos_token_id], len(prompt_ids), False, r))
        else:
            n_long += 1
            expected.append(((prompt_ids + response_ids)[:max_length], len(prompt_ids), True, r))
    assert n_prompt >= 1 and n_long >= 1
    assert (stats["n_dropped"], stats["n_dropped_prompt"], stats["n_truncated"]) == (
        n_prompt,
        n_prompt,
        n_long,
    )
    assert stats["n_rows"] == len(ds) == len(rows) - n_prompt
    assert ds["input_ids"] == [ids for ids, _, _, _ in expected]
    assert ds["labels"] == [[IGNORE_INDEX] * n + ids[n:] for ids, n, _, _ in expected]
    assert list(ds["response_bytes"]) == [len(r["output"].encode()) for _, _, _, r in expected]
    lengths = list(ds["length"])
    assert lengths == [len(x) for x in ds["input_ids"]]
    assert stats["padding_free_tokens"] == sum(lengths)
    assert stats["label_tokens"] == sum(sum(t != IGNORE_INDEX for t in y) for y in ds["labels"])
    assert stats["length_stats"]["max"] == max(lengths) <= max_length
    ends_with_eos = [y[-1] == tok.eos_token_id for y in ds["labels"]]
    assert ends_with_eos == [not cut for _, _, cut, _ in expected]
    assert json.loads((tmp_path / "tok" / STATS_FILE).read_text()) == stats
    json.dumps(stats)  # JSON-able

    again = tokenize_split(src, tiny_models[arch], max_length, tmp_path / "tok")
    assert again["reused"] and again["fingerprint"] == stats["fingerprint"]
    other = tokenize_split(src, tiny_models[arch], max_length + 8, tmp_path / "tok")
    assert not other["reused"] and other["fingerprint"] != stats["fingerprint"]
    assert other["n_dropped"] <= stats["n_dropped"] and other["n_rows"] >= stats["n_rows"]
    dropped = tokenize_split(src, tiny_models[arch], max_length, tmp_path / "tok-drop", long_rows="drop")
    assert dropped["fingerprint"] != stats["fingerprint"] and dropped["n_truncated"] == 0
    assert dropped["n_dropped_long"] == n_long and dropped["n_rows"] == stats["n_rows"] - n_long


def test_fingerprint_follows_data_and_tokenizer(tiny_models, tmp_path):
    from pipeline_lib.tokenization import split_fingerprint

    a = write_jsonl(alpaca_rows(20, seed=1), tmp_path / "a.jsonl")
    b = write_jsonl(alpaca_rows(20, seed=2), tmp_path / "b.jsonl")
    fp = split_fingerprint(a, tiny_models["llama"], 128)
    assert fp == split_fingerprint(a, tiny_models["llama"], 128)
    assert (
        len(
            {
                fp,
                split_fingerprint(b, tiny_models["llama"], 128),
                split_fingerprint(a, tiny_models["bloom"], 128),
            }
        )
        == 3
    )


def test_bad_jsonl_row_is_reported(tiny_models, tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"instruction": "a", "input": "", "output": "b"}\n{"instruction": "no output"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        tokenize_split(src, tiny_models["llama"], 128, tmp_path / "tok")
