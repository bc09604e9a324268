"""Training examples from Alpaca rows, for the tiny Llama (BOS, no pad), Bloom (pad, no BOS) and Falcon
(BOS = EOS = UNK, no pad) tokenizers: masking, EOS, truncation and whole-split tokenization."""

from __future__ import annotations

import json

import pytest

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

ARCHS = ("llama", "bloom", "falcon")

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


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("row", ROWS, ids=[f"row{k}" for k in range(len(ROWS))])
def test_prompt_masked_response_and_eos_learned(arch, row, toks):
    tok = toks[arch]
    instruction, input_, output = row
    ex = encode_example(tok, instruction, input_, output, max_length=512)
    assert ex is not None and not ex["truncated"]
    assert ex["length"] == len(ex["input_ids"]) == len(ex["labels"])
    n = _n_masked(ex)
    # The masked part is exactly the prompt as inference tokenizes it (BOS included where the tokenizer adds one).
    prompt = build_prompt(instruction, input_)
    assert ex["input_ids"][:n] == tok(prompt)["input_ids"]
    # Everything after it is learned, and the labels equal the inputs there.
    assert ex["labels"][n:] == ex["input_ids"][n:]
    assert IGNORE_INDEX not in ex["labels"][n:]
    assert tok.decode(_unmasked(ex)) == output + tok.eos_token
    assert ex["labels"][-1] == ex["input_ids"][-1] == tok.eos_token_id
    assert ex["input_ids"].count(tok.eos_token_id) == 1  # falcon: BOS = EOS, yet no BOS is prepended
    if arch == "llama":
        assert ex["input_ids"][0] == tok.bos_token_id
    else:
        assert ex["input_ids"][0] != tok.bos_token_id


@pytest.mark.parametrize("arch", ARCHS)
def test_with_and_without_input_use_their_templates(arch, toks):
    tok = toks[arch]
    with_input = encode_example(tok, "Summarize.", "A long text.", "Short.", 512)
    without = encode_example(tok, "Summarize.", "", "Short.", 512)
    assert "### Input:" in tok.decode(with_input["input_ids"])
    assert "### Input:" not in tok.decode(without["input_ids"])
    assert _unmasked(with_input) == _unmasked(without)


@pytest.mark.parametrize("arch", ARCHS)
def test_truncation_keeps_prompt_and_eos(arch, toks):
    tok = toks[arch]
    output = "The capital city of France is Paris. " * 40
    full = encode_example(tok, "Tell me about Paris.", "", output, 2048)
    n_prompt = _n_masked(full)
    max_length = n_prompt + 10
    ex = encode_example(tok, "Tell me about Paris.", "", output, max_length)
    assert ex["truncated"] and ex["length"] == max_length
    assert ex["input_ids"][:n_prompt] == full["input_ids"][:n_prompt]  # prompt kept whole
    assert _unmasked(ex) == _unmasked(full)[:9] + [tok.eos_token_id]  # 9 response tokens, then EOS
    assert ex["labels"][-1] == tok.eos_token_id
    # A row that fits exactly is not truncated.
    exact = encode_example(tok, "Tell me about Paris.", "", output, full["length"])
    assert not exact["truncated"] and exact["input_ids"] == full["input_ids"]


@pytest.mark.parametrize("arch", ARCHS)
def test_prompt_too_long_is_dropped(arch, toks):
    tok = toks[arch]
    long_input = "word " * 200
    assert encode_example(tok, "Summarize.", long_input, "Short.", 64) is None
    # Room for exactly one response token plus EOS: kept, truncated.
    n_prompt = _n_masked(encode_example(tok, "Summarize.", "", "Short answer here.", 512))
    ex = encode_example(tok, "Summarize.", "", "Short answer here.", n_prompt + 2)
    assert ex is not None and ex["truncated"] and len(_unmasked(ex)) == 2
    assert encode_example(tok, "Summarize.", "", "Short answer here.", n_prompt + 1) is None


@pytest.mark.parametrize("arch", ARCHS)
def test_special_token_text_in_data_stays_text(arch, toks):
    tok = toks[arch]
    output = f"Use {tok.eos_token} to end, or {tok.bos_token}."
    ex = encode_example(tok, "How do documents end?", "", output, 512)
    assert ex["input_ids"].count(tok.eos_token_id) == 1 and ex["labels"][-1] == tok.eos_token_id
    assert tok.decode(_unmasked(ex)[:-1]) == output


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_encoding_equals_row_by_row(arch, toks):
    tok = toks[arch]
    ins, inp, out = zip(*ROWS, strict=True)
    batch, n_split = encode_batch(tok, list(ins), list(inp), list(out), 512)
    assert n_split == 0
    assert batch == [encode_example(tok, *row, 512) for row in ROWS]


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
    assert ds.column_names == ["input_ids", "labels", "length"]
    assert stats["n_input_rows"] == len(rows)
    assert stats["n_rows"] == len(ds) == len(rows) - stats["n_dropped"]
    assert stats["n_dropped"] >= 1 and stats["n_truncated"] >= 1
    expected = [encode_example(tok, r["instruction"], r["input"], r["output"], max_length) for r in rows]
    kept = [e for e in expected if e is not None]
    assert stats["n_dropped"] == expected.count(None)
    assert stats["n_truncated"] == sum(e["truncated"] for e in kept)
    assert ds["input_ids"] == [e["input_ids"] for e in kept]
    assert ds["labels"] == [e["labels"] for e in kept]
    lengths = list(ds["length"])
    assert lengths == [len(x) for x in ds["input_ids"]]
    assert stats["padding_free_tokens"] == sum(lengths)
    assert stats["label_tokens"] == sum(sum(t != IGNORE_INDEX for t in y) for y in ds["labels"])
    assert stats["length_stats"]["max"] == max(lengths) <= max_length
    assert all(y[-1] == tok.eos_token_id for y in ds["labels"])
    assert json.loads((tmp_path / "tok" / STATS_FILE).read_text()) == stats
    json.dumps(stats)  # JSON-able

    again = tokenize_split(src, tiny_models[arch], max_length, tmp_path / "tok")
    assert again["reused"] and again["fingerprint"] == stats["fingerprint"]
    other = tokenize_split(src, tiny_models[arch], max_length + 8, tmp_path / "tok")
    assert not other["reused"] and other["fingerprint"] != stats["fingerprint"]
    assert other["n_dropped"] <= stats["n_dropped"] and other["n_rows"] >= stats["n_rows"]


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
