"""The chunked training loss (`pipeline_lib.training.loss`, setting `training.loss`): the same loss and
gradients as the plain loss on the model's logits, and never the logits of every position at once.

Tolerances: float32 (eps = 2^-23 ≈ 1.2e-7) and the same products in both paths; only the order of the
float32 sums differs (a sum per chunk, then over chunks; matmuls over other row counts may split their inner
sums otherwise). Reordering a sum of n terms moves it by at most about n·eps times the sum of their
magnitudes. A test batch has at most 80 label tokens, so losses agree to rtol 1e-5 and each gradient tensor to
1e-5 of its largest element (`_close`). The decoder runs the same operations on the same shapes in both paths,
so its hidden states are bitwise equal (checked with the logits below) and 4-bit layers,
whose CPU kernels vary between machines, only ever see the same inputs.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from pipeline_lib import modeling
from pipeline_lib.architectures import FAMILIES, family
from pipeline_lib.batching import IGNORE_INDEX
from pipeline_lib.config import QuantizationConfig, TrainingSettings
from pipeline_lib.training import MemoryPlan, estimate_peak_gib, halve, plan_memory
from pipeline_lib.training.hf_trainer import QabotTrainer, token_sum_loss
from pipeline_lib.training.loss import chunked_token_sum_loss
from pipeline_lib.training.memory import CHUNKED_LOSS_MIN_VOCAB, loss_chunk_tokens

ARCHS = tuple(FAMILIES)
RTOL = 1e-5
EPS32 = torch.finfo(torch.float32).eps
CHUNKS = (1, 7, 64)  # one token; 7, which divides no row's label count nor the total; more than the batch


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=RTOL, atol=RTOL * float(want.abs().max()))


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _batch(vocab: int, seed: int = 0) -> tuple[dict, torch.Tensor]:
    """Three right-padded rows of 41, 29 and 17 tokens: a prompt without labels, padding labelled -100, and
    the last row with no label at all. 36 + 23 = 59 label tokens after the shift."""
    gen = torch.Generator().manual_seed(seed)
    lengths, prompts = (41, 29, 17), (5, 6, 17)
    ids = torch.randint(4, vocab, (3, 41), generator=gen)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for r, (n, p) in enumerate(zip(lengths, prompts, strict=True)):
        mask[r, :n] = 1
        labels[r, p:n] = ids[r, p:n]
    assert int((labels[:, 1:] != IGNORE_INDEX).sum()) == 59
    return {"input_ids": ids, "attention_mask": mask}, labels


def _grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def _plain(model, inputs, labels, num_items):
    return token_sum_loss(model(**inputs), labels, num_items)


# ---- exactness ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_loss_and_gradients_equal_the_plain_loss(arch, tiny_models):
    """The logits are the output head on the decoder's output, bitwise (what `architectures.chunked_loss_exact`
    claims for every family). Every parameter trainable (tied or separate head, Falcon's biases): the batch
    mean and the token sum over a larger step count, and all gradients, at chunk sizes that do and do not
    divide the label count."""
    model = _load(tiny_models[arch])
    inputs, labels = _batch(model.config.vocab_size)
    with torch.no_grad():
        direct = model.get_output_embeddings()(model.get_decoder()(**inputs)[0])
        assert torch.equal(direct, model(**inputs).logits)
    step_tokens = torch.tensor(100)  # the optimizer step's label tokens, more than this batch's 59
    want_mean = _plain(model, inputs, labels, None).detach()
    want = _plain(model, inputs, labels, step_tokens)
    want.backward()
    want_grads = _grads(model)
    assert len(want_grads) == len(list(model.parameters()))
    for chunk in CHUNKS:
        with torch.no_grad():
            mean = chunked_token_sum_loss(model, inputs, labels, None, chunk)
        _close(mean, want_mean)
        got = chunked_token_sum_loss(model, inputs, labels, step_tokens, chunk)
        _close(got, want.detach())
        got.backward()
        grads = _grads(model)
        assert grads.keys() == want_grads.keys()
        for name, grad in grads.items():
            _close(grad, want_grads[name])


def test_lora_gradients_on_a_4bit_base_through_peft(tiny_models):
    """QLoRA as training loads it (NF4 base, float32 compute and upcast head, peft wrapper): the decoder is
    found through the wrapper and the LoRA gradients (adapters initialised at random, so A's are not zero)
    equal the plain path's."""
    from peft import LoraConfig, get_peft_model

    base = modeling.load_model(
        tiny_models["bloom"], QuantizationConfig(compute_dtype="float32"), "cpu", for_training=True
    )
    targets = modeling.lora_target_modules(base)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
    model.eval()  # no LoRA dropout
    inputs, labels = _batch(model.config.vocab_size, seed=1)
    _plain(model, inputs, labels, None).backward()
    want = _grads(model)
    assert want and all("lora_" in n for n in want)
    chunked_token_sum_loss(model, inputs, labels, None, 7).backward()
    got = _grads(model)
    assert got.keys() == want.keys()
    for name, grad in got.items():
        _close(grad, want[name])


def _trainer(path, dataset, tmp_path, chunk: int | None, grads: dict):
    from transformers import TrainerCallback, TrainingArguments

    from pipeline_lib.tokenization import load_tokenizer

    class KeepGradients(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            grads.update({n: p.grad.clone() for n, p in model.named_parameters()})

    args = TrainingArguments(
        output_dir=str(tmp_path / f"out-{chunk}"), use_cpu=True, report_to=[], save_strategy="no",
        disable_tqdm=True, logging_steps=1, optim="sgd", learning_rate=LR, max_steps=1, seed=3,
        per_device_train_batch_size=2, gradient_accumulation_steps=2,
    )  # fmt: skip
    return QabotTrainer(
        model=_load(path).train(),
        args=args,
        train_dataset=dataset,
        processing_class=load_tokenizer(path),
        callbacks=[KeepGradients()],
        batch_size=4,
        loss_chunk_tokens=chunk,
    )


LR = 0.1


def test_a_trainer_step_with_the_chunked_loss_equals_the_plain_one(tiny_models, tmp_path):
    """One optimizer step of 4 rows in 2 micro-batches of different label counts (bloom: tied head; every
    parameter trainable; SGD): the same logged loss, the same gradients after clipping, the same weights
    after the step (up to one float32 rounding of each weight, plus the learning rate times the gradients'
    tolerance)."""
    from datasets import Dataset

    gen = torch.Generator().manual_seed(2)
    rows = []
    for n, prompt in ((23, 4), (31, 9), (12, 3), (40, 5)):
        ids = torch.randint(4, 1024, (n,), generator=gen).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:], "length": n})
    data = Dataset.from_list(rows)
    runs = {}
    for chunk in (None, 5):
        grads: dict = {}
        trainer = _trainer(tiny_models["bloom"], data, tmp_path, chunk, grads)
        head_inputs = []  # the shapes the output head is applied to
        trainer.model.get_output_embeddings().register_forward_hook(
            lambda module, args, out, seen=head_inputs: seen.append(tuple(args[0].shape))
        )
        trainer.train()
        if chunk:  # the chunked loss was used: the head only ever saw chunks of label positions
            assert head_inputs and all(len(s) == 2 and s[0] <= chunk for s in head_inputs), head_inputs
        else:
            assert all(len(s) == 3 for s in head_inputs), head_inputs
        loss = next(h["loss"] for h in trainer.state.log_history if "loss" in h)
        weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        runs[chunk] = (loss, grads, weights)
    (plain_loss, plain_grads, plain_weights), (loss, grads, weights) = runs[None], runs[5]
    assert loss == pytest.approx(plain_loss, rel=RTOL)
    assert grads.keys() == plain_grads.keys() == weights.keys()
    for name, grad in grads.items():
        _close(grad, plain_grads[name])
        w = plain_weights[name]
        tol = LR * RTOL * float(plain_grads[name].abs().max()) + 2 * EPS32 * float(w.abs().max())
        torch.testing.assert_close(weights[name], w, rtol=0, atol=tol)


def test_the_training_stage_hands_the_planned_loss_to_its_trainer(tiny_models, tmp_path):
    """`training.loss` reaches the `QabotTrainer` the training stage builds, through its memory plan."""
    import jobs
    from datasets import Dataset

    from pipeline_lib.contracts import TokenizedData
    from pipeline_lib.tokenization import load_tokenizer
    from pipeline_lib.tracking import make_tracker
    from pipeline_lib.training.trainer import Context, build_trainer, initial_plan

    settings = {"loss": "chunked", "loss_chunk_tokens": 48}
    job = jobs.train_job(
        "falcon", tiny_models["falcon"], TokenizedData.model_construct(eval=None), tmp_path, training=settings
    )
    ctx = Context(job=job, device="cpu", out_dir=tmp_path, run_id="r", tracker=make_tracker(None), events=[])
    dims = {"hidden_size": 64, "num_layers": 2, "vocab_size": 1024}
    pre = {"quantization": {"footprint_bytes": 0}, "lora": {"trainable_params": 0}, "dims": dims}
    plan = initial_plan(ctx, {**pre, "chunkable": True})
    assert plan.loss_chunk_tokens == 48
    data = {
        "tokenizer": load_tokenizer(tiny_models["falcon"]),
        "train": Dataset.from_list([{"input_ids": [5, 6], "labels": [5, 6], "length": 2}]),
        "eval": None,
    }
    _, trainer, _ = build_trainer(ctx, plan, data, 1, None)
    assert trainer.loss_chunk_tokens == 48
    with pytest.raises(ValueError, match="not exact"):
        initial_plan(ctx, {**pre, "chunkable": False})


def test_the_trainer_refuses_the_chunked_loss_where_it_is_not_exact(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64))
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=1
    )
    with pytest.raises(ValueError, match="chunked_loss_exact"):
        QabotTrainer(model=model, args=args, batch_size=1, loss_chunk_tokens=64)


# ---- memory --------------------------------------------------------------------------------------------------


class LiveTensors(TorchDispatchMode):
    """Bytes of the tensors created inside it (every operator's outputs, forward and backward), while they
    are alive: their current sum, its peak, and the largest single one. A storage counts once, from the
    operator that created it until it is freed (a weak reference to it; torch keeps a storage's Python object
    alive as long as any tensor holds the storage, saved-for-backward ones included)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, weakref.ref] = {}
        self.now = self.peak = self.largest = 0

    def _freed(self, key: int, size: int) -> None:
        self.live.pop(key, None)
        self.now -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if size == 0 or key in self.live:
                continue
            self.live[key] = weakref.ref(storage, lambda _, k=key, s=size: self._freed(k, s))
            self.now += size
            self.peak = max(self.peak, self.now)
            self.largest = max(self.largest, size)
        return out


def test_the_chunked_loss_never_holds_the_logits_of_every_position():
    """A Llama with a 16k vocabulary on 2 rows of 256 tokens (508 label tokens), loss and backward, its
    decoder layers trainable (embeddings and head frozen, as in QLoRA): the plain path's float32 logits are
    32 MiB, and its peak holds at least two such tensors (the logits or their gradient, and the log-softmax
    saved for backward), which shows that the count sees them (measured: 106 MiB). The chunked loss with
    64-token chunks: no tensor larger than one chunk's logits (4 MiB), and a peak below one full logits
    tensor, so the full logits never existed (measured: 22 MiB, three chunk-sized tensors and 10 MiB of
    attention scores and activations)."""
    from transformers import AutoModelForCausalLM

    vocab, rows, length, chunk = 16384, 2, 256, 64
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family("llama").tiny_config(vocab, 0, 1, None))
    model.requires_grad_(False)
    model.get_decoder().layers.requires_grad_(True)
    ids = torch.randint(4, vocab, (rows, length))
    labels = ids.clone()
    labels[:, :3] = IGNORE_INDEX
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    full_logits = rows * length * vocab * 4
    for chunked in (False, True):
        model.zero_grad(set_to_none=True)
        with LiveTensors() as mem:
            if chunked:
                loss = chunked_token_sum_loss(model, inputs, labels, None, chunk)
            else:
                loss = _plain(model, inputs, labels, None)
            loss.backward()
        if chunked:
            assert mem.largest <= chunk * vocab * 4, mem.largest
            assert mem.peak < full_logits, mem.peak
        else:
            assert mem.largest >= full_logits and mem.peak >= 2 * full_logits, (mem.largest, mem.peak)


# ---- the setting and the memory plan -------------------------------------------------------------------------


def test_the_setting_picks_the_loss():
    auto = TrainingSettings()
    assert auto.loss == "auto" and auto.loss_chunk_tokens == 512
    assert loss_chunk_tokens(auto, CHUNKED_LOSS_MIN_VOCAB) == 512
    assert loss_chunk_tokens(auto, 250880) == 512  # bloom
    assert loss_chunk_tokens(auto, 50304) is None  # falcon, llama: plain
    assert loss_chunk_tokens(auto, 250880, chunkable=False) is None
    plain = TrainingSettings(loss="plain")
    assert loss_chunk_tokens(plain, 250880) is None
    chunked = TrainingSettings(loss="chunked", loss_chunk_tokens=64)
    assert loss_chunk_tokens(chunked, 1024) == 64
    with pytest.raises(ValueError, match="not exact"):
        loss_chunk_tokens(chunked, 1024, chunkable=False)
    # On the CPU too the plan carries the loss to the trainer.
    dims = dict(weights_gib=0.01, hidden_size=64, num_layers=2, vocab_size=1024)
    assert plan_memory(4, 128, chunked, device="cpu", budget_gib=None, **dims).loss_chunk_tokens == 64
    assert plan_memory(4, 128, auto, device="cpu", budget_gib=None, **dims).loss_chunk_tokens is None


def test_the_plan_counts_one_chunk_of_logits_and_keeps_the_loss_when_halved():
    bloom = dict(weights_gib=2.3, hidden_size=2560, num_layers=30, vocab_size=250880, num_heads=32)
    plain = estimate_peak_gib(2, 512, True, **bloom)
    chunked = estimate_peak_gib(2, 512, True, **bloom, loss_chunk_tokens=512)
    assert plain - chunked == pytest.approx(512 * 250880 * 14 / 2**30)  # 1,024 tokens' logits -> 512's
    assert estimate_peak_gib(1, 512, True, **bloom, loss_chunk_tokens=4096) == estimate_peak_gib(
        1, 512, True, **bloom
    )  # a chunk larger than the micro-batch holds all of its logits
    plan = MemoryPlan(4, 1, False, 2048, 8.0, "start", loss_chunk_tokens=512)
    while plan is not None:
        assert plan.loss_chunk_tokens == 512
        plan = halve(plan)
