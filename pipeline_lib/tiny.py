"""Tiny models built locally from each real architecture's config, and tokenizers trained locally.

They have the same module structure as the real models (`open_llama_3b` = Llama, `bloom-3b` = Bloom,
`falcon-rw-1b` = Falcon with ALiBi, no new decoder architecture, biases) with few layers and a small hidden
size, and tokenizers whose special tokens behave like the real ones:

- llama: `<s>` BOS prepended, `</s>` EOS, no pad token (like OpenLLaMA);
- bloom: `<pad>` pad token, `</s>` EOS, no BOS prepended (like Bloom);
- falcon: `<|endoftext|>` is BOS, EOS and UNK, no pad token (like Falcon-RW's GPT-2 BPE).

The weights are not left random: each model is pre-trained for a few hundred steps on plain generated
text (facts, sums, short answers — no instruction template), so that, like a real base model, it "knows"
the tiny world but not the Alpaca instruction format. Fine-tuning then has something real to teach, and
the comparison report shows differences between architectures. Seeded; built once and cached.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pipeline_lib.prompts import PROMPT_NO_INPUT, PROMPT_WITH_INPUT

ARCHS = ("llama", "bloom", "falcon")
TINY_PREFIX = "tiny:"
TINY_VERSION = 2  # bump when the recipe below changes
PRETRAIN_STEPS = 200

_SPECIALS = {
    "llama": {"bos": "<s>", "eos": "</s>", "unk": "<unk>", "pad": None, "add_bos": True},
    "bloom": {"bos": "<s>", "eos": "</s>", "unk": "<unk>", "pad": "<pad>", "add_bos": False},
    "falcon": {
        "bos": "<|endoftext|>",
        "eos": "<|endoftext|>",
        "unk": "<|endoftext|>",
        "pad": None,
        "add_bos": False,
    },
}


def is_tiny(base_model: str) -> bool:
    return base_model.startswith(TINY_PREFIX)


def tiny_arch(base_model: str) -> str:
    arch = base_model[len(TINY_PREFIX) :]
    if arch not in ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of: {', '.join(ARCHS)}")
    return arch


def _corpus() -> list[str]:
    from pipeline_lib.questions import load_questions
    from pipeline_lib.synthetic import alpaca_rows

    texts = [PROMPT_WITH_INPUT, PROMPT_NO_INPUT]
    for r in alpaca_rows(2000, seed=1):
        texts.append(f"{r['instruction']}\n{r['input']}\n{r['output']}")
    texts += [q.question for q in load_questions()]
    # Other scripts, so that non-English rows tokenize into real pieces, not only bytes.
    texts += [
        "¿Cuál es la capital de Francia? París.",
        "Wie heißt die Hauptstadt? Berlin.",
        "東京は日本の首都です。",
        "Столица России — Москва.",
        "मशीन लर्निंग डेटा से सीखती है।",
        "Ο ήλιος είναι ένα αστέρι.",
    ]
    return texts


def build_tokenizer(arch: str, out_dir: str | Path, vocab_size: int = 1024):
    """Train a byte-level BPE tokenizer with `arch`'s special-token behaviour; save and return it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    sp = _SPECIALS[arch]
    specials = list(dict.fromkeys(t for t in (sp["unk"], sp["bos"], sp["eos"], sp["pad"]) if t))
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    if sp["add_bos"]:
        bos_id = tok.token_to_id(sp["bos"])
        tok.post_processor = processors.TemplateProcessing(
            single=f"{sp['bos']} $A", pair=f"{sp['bos']} $A $B", special_tokens=[(sp["bos"], bos_id)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=sp["bos"],
        eos_token=sp["eos"],
        unk_token=sp["unk"],
        pad_token=sp["pad"],
        model_max_length=2048,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def tiny_config(arch: str, tokenizer):
    """A small config of `arch` with the real model's structure."""
    from transformers import BloomConfig, FalconConfig, LlamaConfig

    ids = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if arch == "llama":  # open_llama_3b: untied head, SiLU gated MLP, RMSNorm, rotary
        return LlamaConfig(
            hidden_size=64,
            intermediate_size=172,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=2048,
            tie_word_embeddings=False,
            **ids,
        )
    if arch == "bloom":  # bloom-3b: ALiBi, fused query_key_value, tied head
        return BloomConfig(hidden_size=64, n_layer=2, n_head=4, **ids)
    if arch == "falcon":  # falcon-rw-1b: ALiBi, no new decoder architecture, sequential attn/MLP, biases
        return FalconConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            alibi=True,
            bias=True,
            new_decoder_architecture=False,
            multi_query=False,
            parallel_attn=False,
            max_position_embeddings=2048,
            **ids,
        )
    raise ValueError(f"unknown architecture {arch!r}")


def pretrain(
    model, tokenizer, steps: int = PRETRAIN_STEPS, seed: int = 0, batch_size: int = 32
) -> list[float]:
    """Plain language-model training on generated text (no prompt template); returns the losses."""
    import random

    import torch

    from pipeline_lib.synthetic import alpaca_rows

    rng = random.Random(seed)
    texts = [
        " ".join(t for t in (r["instruction"], r["input"], r["output"]) if t)
        for r in alpaca_rows(2000, seed + 11)
    ]
    encoded = [ids[:64] + [tokenizer.eos_token_id] for ids in tokenizer(texts)["input_ids"]]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.1, 1 - s / steps))
    model.train()
    losses = []
    for _ in range(steps):
        enc = rng.sample(encoded, batch_size)
        width = max(map(len, enc))
        ids = torch.tensor([e + [pad] * (width - len(e)) for e in enc])
        mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in enc])
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def build_tiny_model(
    arch: str, out_dir: str | Path, seed: int = 0, pretrain_steps: int = PRETRAIN_STEPS
) -> Path:
    """Write a tiny `arch` model (bf16 safetensors + tokenizer), pre-trained on plain text, to `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(arch, out_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, tokenizer), dtype=torch.float32)
    if pretrain_steps:
        pretrain(model, tokenizer, pretrain_steps, seed)
    model.to(torch.bfloat16).save_pretrained(out_dir)
    model.generation_config.save_pretrained(out_dir)
    return out_dir


def directory_fingerprint(path: str | Path) -> str:
    """sha256 over the names and contents of every file in a directory (sorted)."""
    h = hashlib.sha256()
    root = Path(path)
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(root)).encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def materialize_tiny(base_model: str, cache_dir: str | Path) -> tuple[Path, str]:
    """Build (once) the tiny model named `tiny:ARCH` under `cache_dir`; return (path, fingerprint)."""
    arch = tiny_arch(base_model)
    out = Path(cache_dir) / f"tiny-{arch}-v{TINY_VERSION}"
    marker = out / "qabot_tiny.json"
    if not marker.exists():
        tmp = out.with_name(out.name + ".partial")
        build_tiny_model(arch, tmp)
        fp = directory_fingerprint(tmp)
        (tmp / "qabot_tiny.json").write_text(
            json.dumps({"arch": arch, "version": TINY_VERSION, "fingerprint": fp})
        )
        if out.exists():
            import shutil

            shutil.rmtree(out)
        tmp.rename(out)
    return out, json.loads(marker.read_text())["fingerprint"]
