"""What a section trains: a family's reference architecture with random bf16 weights (its tiny config in
`--tiny` mode), saved with a tokenizer the training stage can load, and rows of random token ids with
Alpaca's lengths saved as the tokenized split the stage reads.

Speed and memory do not depend on the weights' or the tokens' values, so no Hub access is needed. The
tokenizer is `tiny.build_tokenizer`'s (1,024 tokens, the family's special tokens at ids 0-3): every id it
can produce, EOS and pad included, indexes the real embedding matrix too, and the rows' ids are drawn from
the model's whole vocabulary.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from typing import Any

from pipeline_lib import architectures, devices
from pipeline_lib.architectures import Family
from pipeline_lib.config import ModelSpec
from pipeline_lib.contracts import LengthStats, ResolvedModel, TokenizedData, TokenizedSplit
from pipeline_lib.files import fingerprint, read_json, write_json
from pipeline_lib.tokenization import IGNORE_INDEX

MODEL_MARKER = "gpu_check_model.json"  # written last: a directory with it is complete
FIRST_ID = 4  # random ids start above the special tokens (unk, bos, eos, pad)
MEDIAN_LENGTH, LENGTH_SIGMA, MIN_LENGTH = 150.0, 0.55, 40  # Alpaca in the prompt template, as anchor_bench.py
PROMPT_SHARE = 3  # the first third of a row is its prompt (labels -100), as instruction rows are


def build_model(family: Family, out_dir: Path, device: str, tiny: bool, seed: int = 0) -> dict[str, Any]:
    """Save `family`'s reference architecture (`real_config()`, or `tiny_config` when `tiny`) with random bf16
    weights, built on `device`, and a tokenizer to `out_dir`; return what was built. A complete directory
    from an earlier section is reused."""
    marker = read_json(out_dir / MODEL_MARKER)
    if marker:
        return {**marker, "reused": True}
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline_lib import tiny as tiny_models

    t = time.time()
    tmp = out_dir.with_name(out_dir.name + ".partial")
    for stale in (tmp, out_dir):
        shutil.rmtree(stale, ignore_errors=True)
    tokenizer = tiny_models.build_tokenizer(family.name, tmp)
    config = tiny_models.tiny_config(family.name, tokenizer) if tiny else family.real_config()
    torch.manual_seed(seed)
    with devices.torch_device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    dims = architectures.dims(model.config)
    model.save_pretrained(tmp)
    del model
    devices.free_memory(device)
    built = {
        "model_type": config.model_type,
        **dims,
        "params": params,
        "bf16_gib": round(params * 2 / devices.GIB, 3),
        "tokenizer_vocab": len(tokenizer),
        "build_save_s": round(time.time() - t, 1),
    }
    write_json(tmp / MODEL_MARKER, built)
    tmp.rename(out_dir)
    return built


def resolved(spec: ModelSpec, family: Family, model_dir: Path, built: dict[str, Any]) -> ResolvedModel:
    """The stage's record of the base model: the preset's name and Hub id, the local random-weight copy."""
    return ResolvedModel(
        name=spec.name,
        base_model=spec.base_model,
        path=str(model_dir),
        revision=None,
        fingerprint=fingerprint(["gpu_check", "random-bf16", built]),
        arch=family.model_type,
        source="local",
    )


def alpaca_lengths(n: int, max_length: int, seed: int, scale: float = 1.0) -> list[int]:
    """`n` row lengths like Alpaca's in the prompt template: log-normal, median ~150, clipped to
    40..max_length; all of it times `scale` (a tiny run's short rows)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    raw = np.exp(rng.normal(math.log(MEDIAN_LENGTH * scale), LENGTH_SIGMA, n))
    return [int(x) for x in np.clip(raw, max(2, round(MIN_LENGTH * scale)), max_length)]


def synthetic_data(
    out_dir: Path,
    n_rows: int,
    vocab_size: int,
    max_length: int,
    seed: int,
    base_model: str,
    length_scale: float = 1.0,
) -> TokenizedData:
    """`n_rows` rows of random token ids below `vocab_size` with `alpaca_lengths`, saved with `datasets` as the
    tokenize stage saves a split (input_ids, labels with the prompt masked, length, response_bytes), and the
    `TokenizedData` record describing it (no held-out split)."""
    import numpy as np
    from datasets import Dataset

    t = time.time()
    lengths = alpaca_lengths(n_rows, max_length, seed, length_scale)
    rng = np.random.default_rng(seed + 1)
    ids = [rng.integers(FIRST_ID, vocab_size, n).tolist() for n in lengths]
    prompts = [n // PROMPT_SHARE for n in lengths]
    labels = [[IGNORE_INDEX] * p + x[p:] for x, p in zip(ids, prompts, strict=True)]
    response_bytes = [4 * (n - p) for n, p in zip(lengths, prompts, strict=True)]  # ~4 bytes a token
    path = out_dir / "train"
    shutil.rmtree(path, ignore_errors=True)
    Dataset.from_dict(
        {"input_ids": ids, "labels": labels, "length": lengths, "response_bytes": response_bytes}
    ).save_to_disk(str(path))
    a = np.asarray(lengths)
    split = TokenizedSplit(
        path=str(path),
        fingerprint=fingerprint(["gpu_check", n_rows, vocab_size, max_length, seed, length_scale]),
        source="synthetic: random token ids with Alpaca's lengths",
        tokenizer="none (random ids)",
        max_length=max_length,
        long_rows="cut",
        template_version="synthetic",
        n_input_rows=n_rows,
        n_rows=n_rows,
        n_truncated=int((a >= max_length).sum()),
        n_dropped=0,
        n_dropped_prompt=0,
        n_dropped_long=0,
        n_boundary_split=0,
        length_stats=LengthStats(
            mean=float(a.mean()),
            median=float(np.median(a)),
            p90=float(np.percentile(a, 90)),
            p99=float(np.percentile(a, 99)),
            max=int(a.max()),
        ),
        padding_free_tokens=int(a.sum()),
        response_bytes=int(sum(response_bytes)),
        label_tokens=int(sum(n - p for n, p in zip(lengths, prompts, strict=True))),
        seconds=round(time.time() - t, 3),
    )
    return TokenizedData(
        train=split,
        eval=None,
        fingerprint=split.fingerprint,
        data_fingerprint=None,
        base_model=base_model,
        max_length=max_length,
        eval_max_length=max_length,
        long_rows="cut",
    )
