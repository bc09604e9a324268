"""Step-planned batching, evaluation batches, collators, packing and the Trainer integration.

Equivalence tests run each tiny architecture in float32 (and 4-bit NF4 with float32 compute): an example's
loss (mean over its label tokens) must be the same inside a right-padded length-grouped batch, or a packed
row where packing is claimed exact, as when the example runs alone. The tiny models' weights are redrawn at
std 0.1 first, so attention is far from uniform and any leak across rows or padding shows in the loss.
"""

from __future__ import annotations

import math
import random
import statistics

import pytest
import torch
import torch.nn.functional as F

from pipeline_lib.architectures import ARCHS  # noqa: E402  (every family in the registry)
from pipeline_lib.batching import (
    IGNORE_INDEX,
    PadCollator,
    StepSampler,
    expected_padding_share,
    pack_collate,
    pad_collate,
    padding_share,
    plan_batches,
    plan_steps,
    supports_exact_packing,
)
from pipeline_lib.synthetic import alpaca_rows, write_jsonl
from pipeline_lib.tokenization import encode_batch, load_tokenized, load_tokenizer, tokenize_split
from pipeline_lib.training.hf_trainer import QabotTrainer, token_sum_loss

ROWS = [
    ("What is the capital city of France?", "", "The capital city of France is Paris."),
    ("Classify the sentiment of the sentence.", "The service was excellent.", "positive"),
    ("Traduce la frase al español.", "Good morning, friend.", "¡Buenos días, amigo! ¿Qué tal? " * 3),
    ("日本の首都はどこですか？", "", "東京は日本の首都です。"),
    (
        "Write a Python function that sums two vectors.",
        "",
        "def add(a, b):\n    return [x + y for x, y in zip(a, b)]",
    ),
]
ATOL = 1e-5


def _alpaca_like_lengths(n: int, seed: int = 0) -> list[int]:
    """Token lengths shaped like Alpaca's (median ~110, long right tail)."""
    rng = random.Random(seed)
    return [min(1304, max(20, int(rng.lognormvariate(4.7, 0.45)))) for _ in range(n)]


# ---- planning ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("budget,max_rows", [(4096, None), (2048, 16), (300, None)])
def test_eval_plan_respects_budget_and_covers_every_row_once(budget, max_rows):
    lengths = _alpaca_like_lengths(5000) + [900, 1304]  # two rows longer than the smallest budget
    batches = plan_batches(lengths, budget, max_rows)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        longest = max(lengths[i] for i in b)
        assert len(b) == 1 or len(b) * longest <= budget
        assert max_rows is None or len(b) <= max_rows
    if budget == 300:
        assert [1304] in [[lengths[i] for i in b] for b in batches if max(lengths[i] for i in b) > budget]
    assert max(lengths[i] for i in batches[0]) == max(lengths)  # longest first: a memory peak shows at once
    assert plan_batches(lengths, budget, max_rows) == batches  # deterministic


@pytest.mark.parametrize("n,batch", [(1003, 4), (1000, 16), (7, 3), (5, 8)])
@pytest.mark.parametrize("grouped", [True, False])
def test_steps_have_batch_size_rows_and_cover_every_row_once(n, batch, grouped):
    lengths = _alpaca_like_lengths(n, seed=n)
    steps = plan_steps(lengths, batch, seed=3, group_by_length=grouped)
    assert sorted(i for st in steps for i in st) == list(range(n))
    assert [len(st) for st in steps] == [batch] * (n // batch) + ([n % batch] if n % batch else [])
    assert plan_steps(lengths, batch, seed=3, group_by_length=grouped) == steps
    if n > 100:
        assert plan_steps(lengths, batch, seed=4, group_by_length=grouped) != steps


def test_steps_do_not_depend_on_the_micro_batch():
    """What makes a resume after an out-of-memory halving exact: step k is the same rows at any micro-batch,
    and skipping `k x accumulation` micro-batches skips exactly steps 0..k-1."""
    lengths = _alpaca_like_lengths(2001, seed=9)
    plans = {micro: StepSampler(lengths, 8, micro, seed=5) for micro in (8, 4, 2, 1)}
    for epoch in (0, 1):
        for sampler in plans.values():
            sampler.set_epoch(epoch)
        steps = plans[8].steps()
        for micro, sampler in plans.items():
            assert sampler.steps() == steps
            batches = list(sampler)
            assert len(batches) == len(sampler)
            accum = 8 // micro
            for k in (0, 1, 17, len(steps) - 1):
                skipped = [i for mb in batches[: k * accum] for i in mb]
                assert sorted(skipped) == sorted(i for st in steps[:k] for i in st), (micro, k)
            assert all(len(mb) <= micro for mb in batches)


def test_sampler_epochs_differ_but_keep_their_length():
    lengths = _alpaca_like_lengths(4000, seed=2)
    sampler = StepSampler(lengths, 16, 4, seed=7)
    plans = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler) == 4000 // 4
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        plans.append(batches)
    assert plans[0] != plans[1] != plans[2]
    sampler.set_epoch(1)
    assert list(sampler) == plans[1]  # deterministic: a resumed run sees the same batches
    with pytest.raises(ValueError, match="divide"):
        StepSampler(lengths, 16, 3)


def test_padding_share_is_far_below_random_batching():
    lengths = _alpaca_like_lengths(5000)
    grouped = expected_padding_share(lengths, 16, 16, group_by_length=True)
    idx = list(range(len(lengths)))
    random.Random(0).shuffle(idx)
    rand = padding_share([idx[k : k + 16] for k in range(0, len(idx), 16)], lengths)
    assert grouped < 0.1 < 0.3 < rand
    assert 0.3 < expected_padding_share(lengths, 16, 16, group_by_length=False) < 0.7
    assert expected_padding_share(lengths, 16, 4) <= grouped  # smaller micro-batches pad less
    assert padding_share([[0], [1, 2]], [5, 4, 2]) == pytest.approx(2 / 13)


# ---- collators -----------------------------------------------------------------------------------------------


def test_pad_collate_right_pads_and_masks_labels_by_position():
    feats = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "length": 3}, {"input_ids": [8], "labels": [8]}]
    out = pad_collate(feats, pad_token_id=7)  # pad id equal to a real (EOS-like) token
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 7, 7]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert PadCollator(7)(feats)["labels"].tolist() == out["labels"].tolist()
    assert pad_collate(feats, 0, pad_to_multiple_of=4)["input_ids"].shape == (2, 4)


def test_pack_collate_restarts_positions_and_never_predicts_across_rows():
    feats = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4, 5], "labels": [4, 5]}]
    out = pack_collate(feats)
    assert out["input_ids"].tolist() == [[1, 2, 3, 4, 5]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert out["labels"].tolist() == [[-100, 2, 3, -100, 5]]
    assert out["use_cache"] is False and "attention_mask" not in out


# ---- equivalence ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sharp_models(tiny_models, tmp_path_factory):
    """{arch: dir} of the tiny models with weights redrawn at std 0.1 (float32), tokenizer included."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("sharp")
    out = {}
    for k, arch in enumerate(ARCHS):
        model = AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32)
        gen = torch.Generator().manual_seed(k)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        model.save_pretrained(root / arch)
        load_tokenizer(tiny_models[arch]).save_pretrained(root / arch)
        out[arch] = root / arch
    return out


def _load(path, quantized: bool = False, attn: str | None = None):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict = {"dtype": torch.float32}
    if attn:
        kwargs["attn_implementation"] = attn
    if quantized:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        )
    return AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()


def _examples(path):
    tok = load_tokenizer(path)
    ex, _ = encode_batch(tok, *map(list, zip(*ROWS, strict=True)), 512)
    assert len({e["length"] for e in ex}) == len(ex)  # all different lengths: padding is exercised
    return tok, ex


def _row_losses(logits, labels):
    ce = F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), labels[:, 1:], ignore_index=IGNORE_INDEX, reduction="none"
    )
    mask = labels[:, 1:] != IGNORE_INDEX
    return (ce * mask).sum(1) / mask.sum(1)


def _packed_losses(logits, labels, lengths):
    ce = F.cross_entropy(logits[0, :-1].float(), labels[0, 1:], ignore_index=IGNORE_INDEX, reduction="none")
    mask = labels[0, 1:] != IGNORE_INDEX
    out, start = [], 0
    for n in lengths:  # an example's targets are its own positions 1..n-1
        seg = slice(start, start + n - 1)
        out.append((ce[seg] * mask[seg]).sum() / mask[seg].sum())
        start += n
    return torch.stack(out)


@torch.no_grad()
def _alone(model, ex):
    def one(e):
        logits = model(input_ids=torch.tensor([e["input_ids"]], device=model.device)).logits.cpu()
        return _row_losses(logits, torch.tensor([e["labels"]]))[0]

    return torch.stack([one(e) for e in ex])


@torch.no_grad()
def _padded(model, ex, pad_id):
    batch = pad_collate(ex, pad_id)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return _row_losses(logits, batch["labels"])


@torch.no_grad()
def _packed(model, ex, use_cache=False):
    batch = pack_collate(ex)
    logits = model(
        input_ids=batch["input_ids"].to(model.device),
        position_ids=batch["position_ids"].to(model.device),
        use_cache=use_cache,
    ).logits.cpu()
    return _packed_losses(logits, batch["labels"], [e["length"] for e in ex])


@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "nf4"])
@pytest.mark.parametrize("arch", ARCHS)
def test_padded_batch_loss_equals_alone(arch, quantized, sharp_models):
    tok, ex = _examples(sharp_models[arch])
    model = _load(sharp_models[arch], quantized)
    alone = _alone(model, ex)
    assert alone.isfinite().all()
    torch.testing.assert_close(_padded(model, ex, tok.pad_token_id), alone, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_the_padding_comparison_sees_a_broken_collator(arch, sharp_models):
    """The comparison above is sharp enough to catch a collator that pads on the left without a mask (the
    rows then attend to the padding): the same examples, padded that way, give other losses."""
    tok, ex = _examples(sharp_models[arch])
    model = _load(sharp_models[arch])
    batch = pad_collate(ex, tok.pad_token_id)
    real = batch["attention_mask"].sum(1)
    ids, labels = batch["input_ids"].clone(), batch["labels"].clone()
    for r, n in enumerate(real.tolist()):  # move the padding to the front
        ids[r] = torch.roll(ids[r], ids.shape[1] - n)
        labels[r] = torch.roll(labels[r], labels.shape[1] - n)
    with torch.no_grad():
        broken = _row_losses(model(input_ids=ids).logits, labels)
    assert (broken - _alone(model, ex)).abs().max() > 1e-3


@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "nf4"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_llama_packed_loss_equals_alone(attn, quantized, sharp_models):
    _, ex = _examples(sharp_models["llama"])
    model = _load(sharp_models["llama"], quantized, attn)
    assert supports_exact_packing(model)
    alone = _alone(model, ex)
    torch.testing.assert_close(_packed(model, ex), alone, atol=ATOL, rtol=0)
    # With a cache the mask builder ignores the packing: the rows then see each other. pack_collate turns it off.
    assert (_packed(model, ex, use_cache=True) - alone).abs().max() > 1e-3


@pytest.mark.gpu
def test_llama_packed_loss_equals_alone_with_flex_attention(sharp_models):
    """flex_attention, which `architectures` also counts as packing exactly, on the GPU: on the CPU it has no
    backward and compiles every shape's forward with inductor (minutes for these rows)."""
    _, ex = _examples(sharp_models["llama"])
    model = _load(sharp_models["llama"], attn="flex_attention").to("cuda")
    assert supports_exact_packing(model)
    alone = _alone(model, ex)
    assert alone.isfinite().all()
    torch.testing.assert_close(_packed(model, ex), alone, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ["bloom", "falcon"])
def test_alibi_models_are_not_packable(arch, sharp_models):
    _, ex = _examples(sharp_models[arch])
    model = _load(sharp_models[arch])
    assert not supports_exact_packing(model)
    alone = _alone(model, ex)
    packed = _packed(model, ex)
    assert (packed[0] - alone[0]).abs() < ATOL  # the first row sees nothing before it ...
    assert (packed[1:] - alone[1:]).abs().max() > 1e-3  # ... later rows attend to the rows before them


def test_supports_exact_packing_sees_through_peft(sharp_models):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_load(sharp_models["llama"]), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert supports_exact_packing(model)
    assert not supports_exact_packing(torch.nn.Linear(2, 2))


# ---- Trainer -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_train_set(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("budget-train")
    rows = alpaca_rows(80, seed=4) + [{"instruction": i, "input": x, "output": o} for i, x, o in ROWS]
    src = write_jsonl(rows, root / "train.jsonl")
    stats = tokenize_split(src, tiny_models["llama"], 256, root / "tok")
    return load_tokenized(stats["path"])


def _trainer(path, dataset, tmp_path, batch=4, micro=2, packing=False, **args):
    from transformers import TrainingArguments

    model = _load(path, attn="eager" if packing else None)
    defaults = dict(
        output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True,
        logging_steps=1, learning_rate=1e-3, seed=3, per_device_train_batch_size=micro,
        gradient_accumulation_steps=batch // micro,
    )  # fmt: skip
    return QabotTrainer(
        model=model,
        args=TrainingArguments(**{**defaults, **args}),
        train_dataset=dataset,
        processing_class=load_tokenizer(path),
        batch_size=batch,
        packing=packing,
    )


def test_trainer_steps_and_schedule(tiny_models, llama_train_set, tmp_path):
    trainer = _trainer(tiny_models["llama"], llama_train_set, tmp_path, batch=8, micro=4, num_train_epochs=2)
    loader = trainer.get_train_dataloader()
    sizes = []
    for batch in loader:
        rows = batch["input_ids"].shape[0]
        assert set(batch) == {"input_ids", "attention_mask", "labels"}
        real = batch["attention_mask"].sum(1)
        # Rows that fit end with a learned EOS.
        ends = batch["labels"][torch.arange(rows), real - 1]
        assert (ends == trainer.processing_class.eos_token_id).all()
        sizes.append(rows)
    n = len(llama_train_set)
    assert sum(sizes) == n and len(sizes) == len(loader)
    steps_per_epoch = math.ceil(n / 8)
    assert sizes[: 2 * (n // 8)] == [4] * (2 * (n // 8))  # every full step: 2 micro-batches of 4 rows
    out = trainer.train()
    assert trainer.state.global_step == trainer.state.max_steps == 2 * steps_per_epoch
    assert math.isfinite(out.training_loss)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert statistics.mean(losses[-3:]) < statistics.mean(losses[:3])  # it learns


def test_trainer_checks_the_step_contract(tiny_models, llama_train_set, tmp_path):
    with pytest.raises(ValueError, match="must equal batch_size"):
        _trainer(
            tiny_models["llama"], llama_train_set, tmp_path, batch=8, micro=2, gradient_accumulation_steps=2
        )


@pytest.mark.parametrize("loss_path", ["model", "token_sum_loss"])
def test_accumulated_gradient_is_token_mean_over_the_step(loss_path, tiny_models, llama_train_set, tmp_path):
    """Micro-batches with different token counts, accumulated: the gradient is that of the mean over all
    label tokens of the step."""
    ga = 3
    trainer = _trainer(tiny_models["llama"], llama_train_set, tmp_path, batch=6, micro=2)
    if loss_path == "token_sum_loss":  # what QabotTrainer does for models without loss keyword arguments
        trainer.model_accepts_loss_kwargs = False
        trainer.compute_loss_func = token_sum_loss
    else:
        assert trainer.model_accepts_loss_kwargs and trainer.compute_loss_func is None
    model = trainer.model
    batches = list(trainer.get_train_dataloader())[:ga]
    tokens = [int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches]
    assert len(set(tokens)) == ga  # different sizes, or the test would prove nothing

    samples, num_items = trainer.get_batch_samples(iter(batches), ga, trainer.args.device)
    assert int(num_items) == sum(tokens)
    trainer.current_gradient_accumulation_steps = ga
    model.zero_grad()
    step_loss = sum(float(trainer.training_step(model, b, num_items)) for b in samples)
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.zero_grad()
    model.train()
    sums, means = [], []
    for b, n in zip(batches, tokens, strict=True):
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        ce = F.cross_entropy(
            logits[:, :-1].transpose(1, 2), b["labels"][:, 1:], ignore_index=IGNORE_INDEX, reduction="sum"
        )
        sums.append(ce)
        means.append(float(ce.detach()) / n)
    reference = torch.stack(sums).sum() / sum(tokens)
    reference.backward()
    assert step_loss == pytest.approx(float(reference.detach()), rel=1e-5)
    assert (
        abs(statistics.mean(means) - float(reference.detach())) > 1e-4
    )  # a mean of batch means would differ
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.grad, atol=1e-6, rtol=1e-4)


def test_trainer_packing(tiny_models, llama_train_set, tmp_path):
    trainer = _trainer(
        tiny_models["llama"], llama_train_set, tmp_path, batch=4, micro=4, packing=True, max_steps=3
    )
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 1
    assert "attention_mask" not in batch and batch["use_cache"] is False
    assert math.isfinite(trainer.train().training_loss)
    with pytest.raises(ValueError, match="packing"):
        _trainer(tiny_models["bloom"], llama_train_set, tmp_path, packing=True)
