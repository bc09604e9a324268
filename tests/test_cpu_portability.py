"""4-bit QLoRA gives the same results on every CPU, with or without AVX512-BF16.

On a CPU with AVX512-BF16 (Sapphire Rapids and newer, most cloud Xeons) bitsandbytes 0.50 repacks a
`Linear4bit` weight for inference the first time the layer runs in eval mode without gradients; from then on
every forward, training ones included, goes through a kernel without an autograd formula, so the gradient
through the frozen 4-bit weights is lost. `modeling.load_model` switches that repacking off.

These tests reach the repacking path on every machine: the `avx512bf16_cpu` fixture makes bitsandbytes build
its 4-bit layers as it does on such a CPU (where it changes nothing). Without the guard in `load_model` they
fail here too (the packed weights are then multiplied by bitsandbytes' generic kernel, which reads them in the
wrong layout and has no gradient either), and on a real AVX512-BF16 CPU they fail exactly as described above.

Comparisons are exact (`torch.equal`): both sides run the same kernels on the same machine in the same order,
so any difference means the computation changed, whatever the CPU's rounding.
"""

from __future__ import annotations

import json
from pathlib import Path

import bitsandbytes as bnb
import bitsandbytes.nn.modules as bnb_modules
import jobs
import pytest
import torch
from bitsandbytes.functional import has_avx512bf16
from peft import get_peft_model

from pipeline_lib import modeling, tokenization
from pipeline_lib.architectures import ARCHS  # noqa: E402  (every family in the registry)
from pipeline_lib.batching import pad_collate
from pipeline_lib.config import LoraSettings, QuantizationConfig
from pipeline_lib.synthetic import alpaca_rows, write_jsonl
from pipeline_lib.training import TrainJob, train_stage

LORA = LoraSettings(r=8, alpha=16, dropout=0.0)


@pytest.fixture
def avx512bf16_cpu(monkeypatch):
    """4-bit layers built from here on behave as on an AVX512-BF16 CPU (repack on an eval forward)."""
    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    probe = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.bfloat16)
    assert probe.support_avx512bf16_for_cpu, "bitsandbytes no longer decides repacking this way: revisit"
    return has_avx512bf16()


def _peft_model(path: str):
    model = modeling.load_model(path, QuantizationConfig(), "cpu", for_training=True)
    targets = modeling.resolve_lora_targets(model, LORA)
    torch.manual_seed(0)  # the same lora_A on both sides
    model = get_peft_model(model, modeling.lora_config(LORA, targets, model))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-zero lora_B, so lora_A gets gradients too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def _batch(path: str) -> dict:
    tok = tokenization.load_tokenizer(path)
    rows = alpaca_rows(4, seed=5)
    examples, _ = tokenization.encode_batch(
        tok, [r["instruction"] for r in rows], [r["input"] for r in rows], [r["output"] for r in rows], 128
    )
    return pad_collate(examples, tok.pad_token_id)


def _train_step(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", ARCHS)
def test_an_eval_pass_changes_nothing_in_the_next_train_step(arch, tiny_models, avx512bf16_cpu):
    path = tiny_models[arch]
    batch = _batch(path)
    loss_alone, grads_alone = _train_step(_peft_model(path), batch)

    model = _peft_model(path)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.out_features % 32 == 0 for m in layers)  # sizes the repacking accepts
    model.eval()
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    loss_after, grads_after = _train_step(model, batch)

    assert torch.equal(loss_after, loss_alone)
    assert grads_after.keys() == grads_alone.keys() and grads_alone
    for name, g in grads_alone.items():
        assert torch.count_nonzero(g) > 0, name  # every LoRA matrix is learning
        assert torch.equal(grads_after[name], g), name


def test_the_guard_undoes_a_repacking_that_already_happened(tiny_models, avx512bf16_cpu):
    """A model repacked before the guard ran (say, by code outside qabot) is restored bit for bit."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    model = modeling.load_model(tiny_models["llama"], QuantizationConfig(), "cpu")
    layer = next(m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    before = layer.weight.data.clone()
    layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu(
        layer.weight.data, layer.weight.quant_state
    )
    assert layer.weight.quant_state.packing_format_for_cpu
    modeling.keep_4bit_layers_trainable(model)
    assert not layer.weight.quant_state.packing_format_for_cpu and torch.equal(layer.weight.data, before)


# ---- the project's trainer: train -> evaluate -> train == train -> train ----------------------------------


@pytest.fixture(scope="module")
def tokenized(tiny_models, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("portability")
    rows = alpaca_rows(40, seed=8)
    prepared = {
        "train_path": str(write_jsonl(rows[:32], root / "train.jsonl")),
        "eval_path": str(write_jsonl(rows[32:], root / "eval.jsonl")),
        "fingerprint": "portability",
    }
    return {arch: jobs.tokenized(prepared, tiny_models[arch], 128, root / f"tok-{arch}") for arch in ARCHS}


def _job(arch: str, tiny_models, tokenized, out_dir: Path, **training) -> TrainJob:
    return jobs.train_job(
        arch, tiny_models[arch], tokenized[arch], out_dir, lora=LORA, training={"save_steps": 100, **training}
    )


def _adapter(result) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(result.adapter_dir) / "adapter_model.safetensors"))


@pytest.mark.parametrize("arch", ARCHS)
def test_evaluating_during_training_does_not_change_training(
    arch, tiny_models, tokenized, tmp_path, avx512bf16_cpu
):
    # Reference: no evaluation at all (no eval split).
    plain_job = _job(arch, tiny_models, tokenized, tmp_path / "plain")
    plain_job = plain_job.model_copy(update={"data": plain_job.data.model_copy(update={"eval": None})})
    plain = train_stage(plain_job)
    # Evaluation before the first step and after every second step.
    evaluated = train_stage(_job(arch, tiny_models, tokenized, tmp_path / "eval", eval_steps=2))

    history = json.loads((tmp_path / "eval" / "log_history.json").read_text())
    assert sum("eval_loss" in h for h in history) >= 4  # step 0, 2, 4, 6, 8
    assert evaluated.metrics.steps == plain.metrics.steps == 8
    losses = [
        h["loss"] for h in json.loads((tmp_path / "plain" / "log_history.json").read_text()) if "loss" in h
    ]
    assert [h["loss"] for h in history if "loss" in h] == losses
    a, b = _adapter(plain), _adapter(evaluated)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
