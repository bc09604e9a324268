"""Tiny models built locally from each real architecture's config, and tokenizers trained locally.

They have the same module structure as the real models (`open_llama_3b` = Llama, `bloom-3b` = Bloom,
`falcon-rw-1b` = Falcon with ALiBi, no new decoder architecture, biases) with few layers and a small hidden
size, and tokenizers whose special tokens behave like the real ones:

- llama: `<s>` BOS prepended, `</s>` EOS, no pad token (like OpenLLaMA);
- bloom: `<pad>` pad token, `</s>` EOS, no BOS prepended (like Bloom);
- falcon: `<|endoftext|>` is BOS, EOS and UNK, no pad token (like Falcon-RW's GPT-2 BPE).

Every dimension that becomes a linear layer's size is a multiple of 64, as in the real models (bitsandbytes'
CPU kernels, for one, assume output sizes in multiples of 32).

The weights are not left random: each model is pre-trained for a few hundred steps on plain text about the
smoke world (`synthetic.pretraining_texts`: its facts in other sentences than the instruction rows, sums,
word lists — no instruction template and no smoke row), so that, like a real base model, it "knows" the
world but not the Alpaca instruction format. Fine-tuning then has something real to teach, and the
comparison report shows differences between architectures.

Built once per recipe: a model is cached under `tiny-<arch>-<recipe hash>` in a shared cache directory
(`default_cache_dir()`), so tests, the demo and every run on the machine reuse it; the hash covers every
setting below, the generated corpus and the torch version, so a changed recipe builds a new model. Concurrent
builders wait on a lock; a build is moved into place only when complete.

The package ships the builds of the current recipe (`SHIPPED_DIR`, about 0.5 MB each, made by
`make tiny-models`): a fresh machine copies them into its cache, after checking their fingerprint, instead
of pre-training (about a minute per model on 2 cores). A recipe without a shipped build (another torch, a
changed setting) is built as above.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pipeline_lib.architectures import ARCHS, family
from pipeline_lib.files import directory_fingerprint
from pipeline_lib.prompts import build_prompt

TINY_PREFIX = "tiny:"
TINY_VERSION = 4  # bump when the recipe changes in a way the hash below cannot see (the code)
PRETRAIN_STEPS = 500  # batches of 32 rows; enough for a 2-layer model to carry a name from a question to its answer (measured)
PRETRAIN_TEXTS = 4000
VOCAB_SIZE = 1024
# the builds of the current recipe, made by `make tiny-models`
SHIPPED_DIR = Path(__file__).parent / "tiny_models"
MARKER = "qabot_tiny.json"


def is_tiny(base_model: str) -> bool:
    return base_model.startswith(TINY_PREFIX)


def tiny_arch(base_model: str) -> str:
    arch = base_model[len(TINY_PREFIX) :]
    if arch not in ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of: {', '.join(ARCHS)}")
    return arch


def _corpus() -> list[str]:
    from pipeline_lib.questions import load_questions
    from pipeline_lib.synthetic import alpaca_rows, pretraining_texts

    # Rows in the prompt template, as real tokenizers see a lot of English: the template's words become a
    # few tokens each instead of dozens of byte pieces (about 30 tokens a prompt, as with real tokenizers).
    texts = [build_prompt(r["instruction"], r["input"]) + r["output"] for r in alpaca_rows(2000, seed=1)]
    texts += pretraining_texts(1000, seed=1)
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


def build_tokenizer(arch: str, out_dir: str | Path, vocab_size: int = VOCAB_SIZE):
    """Train a byte-level BPE tokenizer with `arch`'s special-token behaviour; save and return it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    sp = family(arch).specials
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
    """A small config of `arch` with the real model's structure (`architectures.Family.tiny_config`)."""
    return family(arch).tiny_config(
        len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    )


def linear_sizes(config) -> set[int]:
    """Every input and output size of the linear layers a config builds (for the multiple-of-64 rule)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {
        n for m in model.modules() if isinstance(m, torch.nn.Linear) for n in (m.in_features, m.out_features)
    }


def pretraining_corpus(seed: int = 0) -> list[str]:
    """The plain text the tiny models are pre-trained on (`synthetic.pretraining_texts`)."""
    from pipeline_lib.synthetic import pretraining_texts

    return pretraining_texts(PRETRAIN_TEXTS, seed + 11)


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int = 0) -> Iterator[list[int]]:
    """Endless batches of row indices: each pass shuffles the rows, sorts each window of 16 batches' rows by
    length and cuts it into batches, whose order is shuffled again. Every row comes once per pass, and a batch
    holds rows of similar length, so padding (over half the tokens of a random batch of this corpus) is
    small."""
    import random

    rng = random.Random(seed)
    window = batch_size * 16
    while True:
        order = list(range(len(lengths)))
        rng.shuffle(order)
        batches = []
        for i in range(0, len(order) - batch_size + 1, window):
            part = sorted(order[i : i + window], key=lengths.__getitem__)
            batches += [part[k : k + batch_size] for k in range(0, len(part) - batch_size + 1, batch_size)]
        rng.shuffle(batches)
        yield from batches


def pretrain(model, tokenizer, steps: int | None = None, seed: int = 0, batch_size: int = 32) -> list[float]:
    """Plain language-model training on the smoke world's text (no prompt template); returns the losses.

    Batches hold rows of similar length (`length_grouped_batches`: less than half the compute of random
    batches), and each step's loss is its summed token loss over the corpus' mean predicted tokens per batch,
    so every token weighs the same whatever its batch's length, as in random batches with a token mean.
    (Measured: the token mean per batch, which weighs the tokens of short rows more, left the fine-tuned
    llama-tiny unable to carry a name from a question to its answer.)"""
    steps = PRETRAIN_STEPS if steps is None else steps
    import torch

    texts = pretraining_corpus(seed)
    encoded = [ids[:96] + [tokenizer.eos_token_id] for ids in tokenizer(texts)["input_ids"]]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    mean_targets = batch_size * (sum(map(len, encoded)) / len(encoded) - 1)  # predicted tokens per batch
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.1, 1 - s / steps))
    model.train()
    losses = []
    batches = length_grouped_batches([len(e) for e in encoded], batch_size, seed)
    for _ in range(steps):
        enc = [encoded[i] for i in next(batches)]
        width = max(map(len, enc))
        ids = torch.tensor([e + [pad] * (width - len(e)) for e in enc])
        mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in enc])
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        targets = ids.masked_fill(mask == 0, -100)[:, 1:]
        loss = (
            torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)).float(),
                targets.reshape(-1),
                ignore_index=-100,
                reduction="sum",
            )
            / mean_targets
        )
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def build_tiny_model(
    arch: str, out_dir: str | Path, seed: int = 0, pretrain_steps: int | None = None
) -> Path:
    """Write a tiny `arch` model (bf16 safetensors + tokenizer), pre-trained on plain text, to `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(arch, out_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, tokenizer), dtype=torch.float32)
    steps = PRETRAIN_STEPS if pretrain_steps is None else pretrain_steps
    if steps:
        pretrain(model, tokenizer, steps, seed)
    model.to(torch.bfloat16).save_pretrained(out_dir)
    model.generation_config.save_pretrained(out_dir)
    return out_dir


@functools.cache
def recipe_hash(arch: str) -> str:
    """Identity of everything that decides a tiny model's files: sizes, steps, corpora, special tokens, versions."""
    import torch
    import transformers

    recipe = {
        "version": TINY_VERSION,
        "arch": arch,
        "specials": family(arch).specials,
        "config": family(arch).tiny_config(VOCAB_SIZE, 0, 1, None).to_json_string(use_diff=False),
        "pretrain": [PRETRAIN_STEPS, PRETRAIN_TEXTS],
        "tokenizer_corpus": hashlib.sha256("\x00".join(_corpus()).encode()).hexdigest(),
        "pretrain_corpus": hashlib.sha256("\x00".join(pretraining_corpus()).encode()).hexdigest(),
        "torch": ".".join(torch.__version__.split(".")[:2]),
        "transformers": transformers.__version__.split(".")[0],
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def default_cache_dir() -> Path:
    """Where tiny models are cached: $QABOT_TINY_CACHE, else $XDG_CACHE_HOME/qabot/tiny (~/.cache/qabot/tiny)."""
    if os.environ.get("QABOT_TINY_CACHE"):
        return Path(os.environ["QABOT_TINY_CACHE"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "qabot" / "tiny"


def materialize_tiny(
    base_model: str, cache_dir: str | Path | None = None, shipped_dir: str | Path | None = SHIPPED_DIR
) -> tuple[Path, str]:
    """The tiny model named `tiny:ARCH` under `cache_dir` (default: `default_cache_dir()`), copied from the
    shipped build of its recipe in `shipped_dir` when there is one whose files match its fingerprint, else
    built (once per recipe); return (path, fingerprint). Safe to call from several processes at once."""
    import fcntl

    arch = tiny_arch(base_model)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    out = root / f"tiny-{arch}-{recipe_hash(arch)}"
    marker = out / MARKER
    if not marker.exists():
        with open(root / f".{out.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # a second builder waits here, then finds the model
            if not marker.exists():
                tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=root))
                try:
                    shipped = Path(shipped_dir) / out.name if shipped_dir is not None else None
                    if not (shipped is not None and _copy_shipped(shipped, tmp)):
                        build_tiny_model(arch, tmp)
                    fp = directory_fingerprint(tmp)
                    (tmp / MARKER).write_text(
                        json.dumps({"arch": arch, "recipe": out.name, "fingerprint": fp})
                    )
                    if out.exists():
                        shutil.rmtree(out)
                    tmp.rename(out)
                finally:
                    if tmp.exists():
                        shutil.rmtree(tmp)
    return out, json.loads(marker.read_text())["fingerprint"]


def _copy_shipped(shipped: Path, dest: Path) -> bool:
    """Copy a shipped build (every file but its marker) into the empty directory `dest`; True when the copy's
    fingerprint is the one its marker records (a damaged or partial build is not used: `dest` is emptied)."""
    try:
        recorded = json.loads((shipped / MARKER).read_text())["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    for f in shipped.iterdir():
        if f.is_file() and f.name != MARKER:
            shutil.copyfile(f, dest / f.name)
    if directory_fingerprint(dest) == recorded:
        return True
    for f in dest.iterdir():
        f.unlink()
    return False


def ship_tiny_models(shipped_dir: str | Path = SHIPPED_DIR) -> list[Path]:
    """Build every architecture's tiny model of the current recipe into `shipped_dir` (each as the cache keeps
    it, marker included) and remove shipped builds of other recipes; return the builds' paths."""
    shipped_dir = Path(shipped_dir)
    with tempfile.TemporaryDirectory() as scratch:
        built = [materialize_tiny(f"{TINY_PREFIX}{arch}", scratch, shipped_dir=None)[0] for arch in ARCHS]
        shipped_dir.mkdir(parents=True, exist_ok=True)
        for old in shipped_dir.glob("tiny-*"):
            shutil.rmtree(old)
        return [Path(shutil.copytree(path, shipped_dir / path.name)) for path in built]


if __name__ == "__main__":  # `make tiny-models`
    for p in ship_tiny_models():
        print(p)
