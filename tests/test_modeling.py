"""Base model loading, pre-flight checks and merging, on tiny Llama/Bloom/Falcon models (CPU, 4-bit NF4)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from network import needs_hub, needs_no_hub

from pipeline_lib import modeling
from pipeline_lib.architectures import (
    ARCHS,  # noqa: E402  (every family in the registry)
    family,
)
from pipeline_lib.config import LoraSettings, ModelSpec, QuantizationConfig
from pipeline_lib.files import directory_fingerprint

Q4 = QuantizationConfig()
BF16 = QuantizationConfig(load_in_4bit=False, compute_dtype="bfloat16")
FP32 = QuantizationConfig(load_in_4bit=False, compute_dtype="float32")
EXPECTED_TARGETS = {
    "llama": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
    "bloom": ["dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value"],
    "falcon": ["dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value"],
}
LINEARS = {"llama": 14, "bloom": 8, "falcon": 8}  # 2 layers each
TEXTS = ["### Instruction:\nName a colour.\n\n### Response:\nBlue.", "What is the capital of France? Paris."]


@pytest.fixture(scope="module")
def tiny(tiny_models) -> dict[str, Path]:
    """The session's tiny models (conftest), built once for every test module."""
    return {a: Path(tiny_models[a]) for a in ARCHS}


def _tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _batch(tok, texts=TEXTS):
    ids = [tok(t)["input_ids"] for t in texts]
    n = min(len(i) for i in ids)
    return torch.tensor([i[:n] for i in ids])


def _train(path: Path, out: Path, arch: str, steps: int = 4) -> tuple[Path, dict]:
    from peft import get_peft_model

    torch.manual_seed(0)
    model = modeling.load_model(path, Q4, "cpu", for_training=True, gradient_checkpointing=arch == "falcon")
    assert model.training
    targets = modeling.lora_target_modules(model)
    settings = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=targets)
    peft_model = get_peft_model(model, modeling.lora_config(settings, targets, model))
    modeling.lora_report(peft_model)
    initial = modeling.snapshot_lora(peft_model)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=3e-2)
    x = _batch(_tokenizer(path))
    for _ in range(steps):
        loss = peft_model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    peft_model.save_pretrained(str(out))
    return out, initial


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    root = tmp_path_factory.mktemp("adapters")
    return {a: _train(tiny[a], root / a, a) for a in ARCHS}


# ---------------------------------------------------------------------------------------------- quantization


@pytest.mark.parametrize("arch", ARCHS)
def test_every_linear_but_the_head_loads_in_4bit(tiny, arch):
    model = modeling.load_model(tiny[arch], Q4, "cpu")
    rep = modeling.quantization_report(model)
    assert rep["linear_layers"] == LINEARS[arch]
    assert rep["share_4bit"] == 1.0 and rep["linear_kinds"] == ["Linear4bit"]
    assert rep["quant_types"] == ["nf4"]
    assert rep["footprint_bytes"] < rep["bf16_footprint_bytes"]
    assert type(model.lm_head) is torch.nn.Linear
    modeling.check_quantized(rep, arch)
    json.dumps(rep)
    assert not model.training


def test_falcon_without_the_fix_loads_no_4bit_layer_and_preflight_stops_it(tiny):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(tiny["falcon"]), quantization_config=modeling.bnb_config(Q4), device_map={"": "cpu"}
    )
    rep = modeling.quantization_report(model)
    assert rep["linear_4bit"] == 0 and rep["linear_kinds"] == ["FalconLinear"]
    with pytest.raises(modeling.PreflightError, match=r"^falcon: quantization check failed: only 0/8"):
        modeling.check_quantized(rep, "falcon")


def test_falcon_fix_gives_the_same_fp32_outputs(tiny):
    from transformers import AutoModelForCausalLM
    from transformers.models.falcon import modeling_falcon

    path = str(tiny["falcon"])
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with family("falcon").loading_patch():
        fixed = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert modeling_falcon.FalconLinear is not torch.nn.Linear  # restored
    assert type(plain.transformer.h[0].mlp.dense_h_to_4h) is modeling_falcon.FalconLinear
    assert type(fixed.transformer.h[0].mlp.dense_h_to_4h) is torch.nn.Linear
    x = _batch(_tokenizer(tiny["falcon"]))
    with torch.no_grad():
        a, b = plain(x).logits, fixed(x).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_unquantized_model_fails_the_quantization_check(tiny):
    model = modeling.load_model(tiny["llama"], BF16, "cpu")
    assert modeling.bnb_config(BF16) is None
    rep = modeling.quantization_report(model)
    assert rep["share_4bit"] == 0.0 and rep["linear_layers"] == 14
    with pytest.raises(modeling.PreflightError, match="only 0/14 linear layers are 4-bit"):
        modeling.check_quantized(rep, "llama")
    modeling.check_quantized(rep, "llama", expected=False)
    q4 = modeling.quantization_report(modeling.load_model(tiny["llama"], Q4, "cpu"))
    with pytest.raises(modeling.PreflightError, match="4-bit was not requested"):
        modeling.check_quantized(q4, "llama", expected=False)


@pytest.mark.parametrize("arch", ARCHS)
def test_one_layer_left_unquantized_fails_the_check(tiny, arch):
    """All but one linear layer in 4-bit is still a failure, naming the layer that is not."""
    import bitsandbytes as bnb

    model = modeling.load_model(tiny[arch], Q4, "cpu")
    name, layer = next((n, m) for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit))
    parent_name, _, child = name.rpartition(".")
    plain = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    setattr(model.get_submodule(parent_name), child, plain)
    rep = modeling.quantization_report(model)
    n = LINEARS[arch]
    assert (rep["linear_layers"], rep["linear_4bit"], rep["not_4bit"]) == (n, n - 1, [name])
    with pytest.raises(
        modeling.PreflightError, match=rf"only {n - 1}/{n} linear layers are 4-bit \(not 4-bit: {name}"
    ):
        modeling.check_quantized(rep, arch)


def test_bnb_config_follows_the_settings():
    cfg = modeling.bnb_config(
        QuantizationConfig(quant_type="fp4", double_quant=False, compute_dtype="float32")
    )
    assert cfg.load_in_4bit and cfg.bnb_4bit_quant_type == "fp4" and not cfg.bnb_4bit_use_double_quant
    assert cfg.bnb_4bit_compute_dtype == torch.float32


def test_training_load_upcasts_and_enables_checkpointing(tiny):
    model = modeling.load_model(tiny["llama"], Q4, "cpu", for_training=True, gradient_checkpointing=True)
    assert model.training and modeling.is_checkpointing(model) and model.config.use_cache is False
    assert model.model.norm.weight.dtype == torch.float32
    assert model.get_input_embeddings().weight.dtype == torch.float32
    assert not any(p.requires_grad for p in model.parameters())

    lean = modeling.load_model(
        tiny["llama"], Q4, "cpu", for_training=True, gradient_checkpointing=True, upcast_fp32=False
    )
    assert lean.training and modeling.is_checkpointing(lean)
    assert lean.get_input_embeddings().weight.dtype == torch.bfloat16
    assert not any(p.requires_grad for p in lean.parameters())
    plain = modeling.load_model(tiny["llama"], Q4, "cpu")
    assert not plain.training and not modeling.is_checkpointing(plain)


# ---------------------------------------------------------------------------------------------- LoRA targets


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_targets_are_the_linear_layers_without_the_head(tiny, arch):
    model = modeling.load_model(tiny[arch], Q4, "cpu")
    targets = modeling.lora_target_modules(model)
    assert targets == EXPECTED_TARGETS[arch]
    assert "lm_head" not in targets
    assert modeling.resolve_lora_targets(model, LoraSettings()) == targets


def test_explicit_lora_target_matching_nothing_fails(tiny):
    model = modeling.load_model(tiny["bloom"], Q4, "cpu")
    bad = LoraSettings(target_modules=["query_key_value", "foo"])
    with pytest.raises(modeling.PreflightError, match=r"^LoRA target 'foo' matches no module of bloom$"):
        modeling.lora_config(bad, bad.target_modules, model, "bloom")
    with pytest.raises(modeling.PreflightError, match="'q_proj' matches no module"):
        modeling.resolve_lora_targets(model, LoraSettings(target_modules=["q_proj"]), "bloom")
    cfg = modeling.lora_config(LoraSettings(r=8, alpha=16), ["dense"], model)
    assert cfg.r == 8 and cfg.lora_alpha == 16 and cfg.bias == "none" and cfg.task_type == "CAUSAL_LM"


def test_lora_report_and_its_failures(tiny):
    from peft import LoraConfig, get_peft_model

    model = modeling.load_model(tiny["llama"], Q4, "cpu", for_training=True)
    targets = modeling.lora_target_modules(model)
    peft_model = get_peft_model(model, modeling.lora_config(LoraSettings(r=4), targets, model))
    rep = modeling.lora_report(peft_model, "llama")
    assert rep["targets"] == targets and rep["lora_layers"] == 14
    assert all(c == 2 for c in rep["layers_per_target"].values())
    assert rep["trainable_params"] == 2 * (4 * 4 * (64 + 64) + 3 * 4 * (64 + 192))  # layers * r * (in + out)
    assert 0 < rep["trainable_share"] < 1 and rep["trainable_non_lora"] == []
    json.dumps(rep)
    peft_model.requires_grad_(False)
    with pytest.raises(modeling.PreflightError, match="llama: LoRA check failed: no trainable parameters"):
        modeling.lora_report(peft_model, "llama")

    # peft wraps what matches and ignores the rest of a list; the report does not
    model = modeling.load_model(tiny["llama"], Q4, "cpu", for_training=True)
    partial = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "nope"], task_type="CAUSAL_LM"))
    with pytest.raises(modeling.PreflightError, match="LoRA target 'nope' matches no module of llama"):
        modeling.lora_report(partial, "llama")


# ---------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_reports_per_architecture(tiny):
    reps = {}
    for arch in ARCHS:
        cfg = json.loads((tiny[arch] / "config.json").read_text())
        from transformers import AutoConfig

        reps[arch] = modeling.tokenizer_report(
            _tokenizer(tiny[arch]), f"tiny:{arch}", AutoConfig.from_pretrained(tiny[arch])
        )
        assert reps[arch]["eos_matches_config"] and reps[arch]["eos_token_id"] == cfg["eos_token_id"]
        assert reps[arch]["vocab_size"] <= reps[arch]["embedding_rows"]
        assert reps[arch]["roundtrip_ok"] and reps[arch]["use_fast_honoured"]
        json.dumps(reps[arch])
    assert reps["llama"]["prepends_bos"] and reps["llama"]["bos_matches_config"]
    assert not reps["llama"]["has_pad"] and any("no pad token" in w for w in reps["llama"]["warnings"])
    assert reps["bloom"]["has_pad"] and not reps["bloom"]["pad_is_eos"] and not reps["bloom"]["prepends_bos"]
    assert (
        reps["falcon"]["bos_token_id"] == reps["falcon"]["eos_token_id"]
        and not reps["falcon"]["prepends_bos"]
    )


def test_tokenizer_without_eos_fails(tiny):
    from transformers import AutoConfig

    tok = _tokenizer(tiny["llama"])
    tok.eos_token = None
    with pytest.raises(
        modeling.PreflightError, match="tiny:llama: tokenizer check failed: the tokenizer has no EOS"
    ):
        modeling.tokenizer_report(tok, "tiny:llama", AutoConfig.from_pretrained(tiny["llama"]))


def test_token_ids_beyond_the_embedding_fail(tiny):
    from transformers import AutoConfig

    tok, cfg = _tokenizer(tiny["bloom"]), AutoConfig.from_pretrained(tiny["bloom"])
    with pytest.raises(modeling.PreflightError, match="token id 1023 exceeds the 1000-row embedding matrix"):
        modeling.tokenizer_report(tok, "tiny:bloom", cfg, embedding_rows=1000)
    tok.add_tokens(["<extra_token>"])
    with pytest.raises(modeling.PreflightError, match="exceeds the 1024-row"):
        modeling.tokenizer_report(tok, "tiny:bloom", cfg)


def test_eos_mismatch_and_tokenizer_advice_are_reported(tiny):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(tiny["llama"])
    cfg.eos_token_id = 7
    rep = modeling.tokenizer_report(_tokenizer(tiny["llama"]), "openlm-research/open_llama_3b", cfg)
    assert rep["eos_matches_config"] is False and rep["use_fast_recommended"] is False
    assert rep["use_fast_honoured"] is False and len(rep["warnings"]) == 3
    assert modeling.recommended_use_fast("openlm-research/open_llama_3b") is False
    assert modeling.recommended_use_fast("bigscience/bloom-3b") is None
    assert modeling.recommended_use_fast("tiny:falcon") is None


# ---------------------------------------------------------------------------------------------- adapter


@pytest.mark.parametrize("arch", ARCHS)
def test_training_changes_the_adapter_and_the_check_passes(trained, arch):
    adapter_dir, initial = trained[arch]
    rep = modeling.check_adapter(adapter_dir, initial)
    assert rep["lora_A"] == rep["lora_B"] == LINEARS[arch]
    assert rep["changed_tensors"] > 0 and rep["lora_B_max_abs"] > 0
    assert sorted(rep["targets"]) == EXPECTED_TARGETS[arch]
    json.dumps(rep)


def test_untouched_empty_or_missing_adapter_fails(tiny, tmp_path):
    from peft import get_peft_model

    model = modeling.load_model(tiny["falcon"], Q4, "cpu", for_training=True)
    targets = modeling.lora_target_modules(model)
    peft_model = get_peft_model(model, modeling.lora_config(LoraSettings(r=4), targets, model))
    initial = modeling.snapshot_lora(peft_model)
    peft_model.save_pretrained(str(tmp_path / "untouched"))
    with pytest.raises(modeling.PreflightError, match="adapter unchanged from initialisation"):
        modeling.check_adapter(tmp_path / "untouched", initial, "falcon")
    with pytest.raises(modeling.PreflightError, match="adapter unchanged from initialisation"):
        modeling.check_adapter(tmp_path / "untouched")  # lora_B all zero even without a snapshot

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(modeling.PreflightError, match="^falcon: adapter saved empty"):
        modeling.check_adapter(empty, initial, "falcon")
    from safetensors.torch import save_file

    save_file({}, str(empty / "adapter_model.safetensors"))
    with pytest.raises(modeling.PreflightError, match="adapter saved empty"):
        modeling.check_adapter(empty, initial, "falcon")
    with pytest.raises(modeling.PreflightError, match="no adapter file"):
        modeling.check_adapter(tmp_path / "missing", initial, "falcon")


# ---------------------------------------------------------------------------------------------- merge


def _bf16_gap(base: Path, adapter_dir: Path, tok) -> tuple[float, float]:
    """(max, mean) absolute log-probability difference between base + adapter computed in bfloat16 and in
    float32 on TEXTS: the rounding floor of bfloat16 on this machine."""
    from peft import PeftModel

    out = []
    for q in (BF16, FP32):
        model = PeftModel.from_pretrained(modeling.load_model(base, q), str(adapter_dir)).eval()
        out.append(modeling.token_logprobs(model, tok, TEXTS, 256, "cpu"))
    diffs = [(a - b).abs() for (a, _), (b, _) in zip(*out, strict=True)]
    return max(float(d.max()) for d in diffs), float(torch.cat([d.flatten() for d in diffs]).mean())


@pytest.mark.parametrize("arch", ARCHS)
def test_merged_model_matches_the_unmerged_one(tiny, trained, tmp_path, arch):
    from transformers import AutoModelForCausalLM

    adapter_dir, _ = trained[arch]
    rep = modeling.merge_adapter(tiny[arch], adapter_dir, tmp_path / "merged")
    assert rep["merged_layers"] == LINEARS[arch] and rep["dtype"] == "bfloat16"
    merged_dir = Path(rep["merged_dir"])
    assert (merged_dir / "model.safetensors").is_file() and "tokenizer.json" in rep["tokenizer_files"]
    assert (merged_dir / "tokenizer.json").read_bytes() == (tiny[arch] / "tokenizer.json").read_bytes()
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir))
    assert not any("lora" in k for k in merged.state_dict())
    tok = _tokenizer(merged_dir)

    same = modeling.merge_fidelity(tiny[arch], adapter_dir, merged_dir, BF16, tok, TEXTS)
    assert same["reference"] == "bfloat16 base + adapter"
    # Merging rounds W + s*BA to bfloat16 once: an error of the same kind and size as computing the
    # unmerged model in bfloat16 at all. So the bound is that model's own bfloat16-vs-float32 gap, measured
    # here on this machine (CPUs with AMX round bfloat16 differently, which moves both sides). Measured on
    # an AVX2 CPU: merge error / gap = 1.06 (llama), 0.60 (bloom), 1.84 (falcon); 3x leaves room.
    gap_max, gap_mean = _bf16_gap(tiny[arch], adapter_dir, tok)
    assert same["max_abs_logprob_diff"] <= 3 * gap_max, (same, gap_max)
    assert abs(same["loss_delta"]) <= 3 * gap_mean, (same, gap_mean)
    assert same["top1_agreement"] >= 0.9

    # the adapter did move the outputs: the base alone is further away than the merge error
    base = modeling.token_logprobs(modeling.load_model(tiny[arch], BF16), tok, TEXTS, 256, "cpu")
    mer = modeling.token_logprobs(merged.to(torch.bfloat16).eval(), tok, TEXTS, 256, "cpu")
    moved = max(float((a - b).abs().max()) for (a, _), (b, _) in zip(base, mer, strict=True))
    assert moved > 3 * same["max_abs_logprob_diff"]

    trained_as = modeling.merge_fidelity(tiny[arch], adapter_dir, merged_dir, Q4, tok, TEXTS)
    assert trained_as["reference"] == "4-bit base + adapter" and trained_as["tokens"] > 10
    assert trained_as["max_abs_logprob_diff"] > 0 and abs(trained_as["loss_delta"]) < 1.0
    json.dumps(trained_as)


def test_merge_stage_merges_checks_and_serves(tiny, trained, tmp_path):
    """The stage the flow runs: merge, fidelity against the trained (4-bit) model, a merge record on disk; the
    merged directory then answers questions through the logged model class, with the training template."""
    import fakes
    import pandas as pd

    from pipeline_lib.merge import MergeJob, merge_stage
    from pipeline_lib.serving import QABotModel

    adapter_dir, _ = trained["bloom"]
    out = tmp_path / "merged-bloom"
    model = fakes.resolved("bloom").model_copy(update={"path": str(tiny["bloom"]), "arch": "bloom"})
    heldout = _heldout(tmp_path)
    job = MergeJob(
        model=model,
        trained=fakes.trained("bloom", str(adapter_dir)),
        quantization=Q4,
        heldout_path=str(heldout),
        device="cpu",
        out_dir=str(out),
    )
    res = merge_stage(job)
    assert res.merged_dir == str(out) and res.fingerprint == directory_fingerprint(out)
    err, gap = res.fidelity["merge_error"], res.fidelity["quantization_gap"]
    assert err["reference"] == "bfloat16 base + adapter" and gap["reference"] == "4-bit base + adapter"
    assert err["texts"] == 8 and err["tokens"] > 100  # held-out rows in the training template
    assert abs(err["loss_delta"]) <= job.settings.max_loss_delta and err["top1_agreement"] >= 0.9
    assert res.registered is None  # no tracking: nothing registered
    record = json.loads((tmp_path / "merged-bloom.merge.json").read_text())
    assert record["gate_problems"] == [] and record["merge_error"] == err

    served = QABotModel()
    served.load_context(type("Ctx", (), {"artifacts": {"model_dir": str(out)}})())
    params = {"max_new_tokens": 6, "do_sample": False, "temperature": 0.7, "repetition_penalty": 1.0}
    listed = served.predict(None, ["What is the capital city of Norway?", "Is 7 even or odd?"], params)
    framed = served.predict(
        None, pd.DataFrame({"question": ["What is the capital city of Norway?", "Is 7 even or odd?"]}), params
    )
    assert listed == framed and len(listed) == 2 and all(isinstance(a, str) for a in listed)


def _heldout(tmp_path) -> Path:
    from pipeline_lib.synthetic import alpaca_rows, write_jsonl

    return write_jsonl(alpaca_rows(12, seed=21), tmp_path / "heldout.jsonl")


def test_a_corrupted_merge_fails_the_merge_gate(tiny, trained, tmp_path, monkeypatch):
    """A merge that applies the adapter twice (its delta added again to every merged weight) fails the stage
    with one line naming the model and what moved; nothing is registered."""
    import fakes
    from safetensors.torch import load_file, save_file

    from pipeline_lib import merge as merge_module
    from pipeline_lib.merge import MergeGateError, MergeJob, merge_stage

    real = merge_module.modeling.merge_adapter

    def twice(base_path, adapter_dir, out_dir, **kw):
        info = real(base_path, adapter_dir, out_dir, **kw)
        f = Path(out_dir) / "model.safetensors"
        merged, base = load_file(str(f)), load_file(str(Path(base_path) / "model.safetensors"))
        for k in merged:
            if k in base and merged[k].is_floating_point():
                merged[k] = (2 * merged[k].float() - base[k].float()).to(merged[k].dtype)
        save_file(merged, str(f), metadata={"format": "pt"})
        return info

    monkeypatch.setattr(merge_module.modeling, "merge_adapter", twice)
    adapter_dir, _ = trained["llama"]
    model = fakes.resolved("llama").model_copy(update={"path": str(tiny["llama"])})
    job = MergeJob(
        model=model,
        trained=fakes.trained("llama-tiny", str(adapter_dir)),
        quantization=Q4,
        heldout_path=str(_heldout(tmp_path)),
        device="cpu",
        out_dir=str(tmp_path / "merged"),
    )
    with pytest.raises(MergeGateError) as info:
        merge_stage(job)
    message = str(info.value)
    assert message.startswith("llama-tiny: merge gate failed:") and "\n" not in message
    assert "top-1 agreement" in message or "mean token loss moved" in message
    record = json.loads((tmp_path / "merged.merge.json").read_text())
    assert record["gate_problems"]
    # switched off, the same merge passes through (and says what it saw)
    ok = merge_stage(job.model_copy(update={"settings": job.settings.model_copy(update={"gate": False})}))
    assert (
        ok.fidelity["merge_error"]["top1_agreement"] < 0.9
        or abs(ok.fidelity["merge_error"]["loss_delta"]) > 0.02
    )


def test_float32_merge_is_exact(tiny, trained, tmp_path):
    adapter_dir, _ = trained["falcon"]
    rep = modeling.merge_adapter(tiny["falcon"], adapter_dir, tmp_path / "m32", dtype=torch.float32)
    assert rep["dtype"] == "float32"
    tok = _tokenizer(tiny["falcon"])
    fid = modeling.merge_fidelity(tiny["falcon"], adapter_dir, rep["merged_dir"], FP32, tok, TEXTS)
    assert fid["max_abs_logprob_diff"] < 1e-4 and fid["top1_agreement"] == 1.0


# ---------------------------------------------------------------------------------------------- resolving


def test_resolve_tiny_and_local(tmp_path):
    tiny = modeling.resolve_base_model(ModelSpec(name="t", base_model="tiny:falcon"), tmp_path)
    assert tiny.arch == "falcon" and tiny.source == "tiny" and tiny.revision is None
    local = modeling.resolve_base_model(ModelSpec(name="l", base_model=tiny.path), tmp_path / "other")
    assert local.source == "local" and local.fingerprint == directory_fingerprint(tiny.path)
    assert json.loads(json.dumps(local.to_dict()))["arch"] == "falcon"
    with pytest.raises(modeling.ModelSourceError, match="not a model directory"):
        modeling.resolve_base_model(ModelSpec(name="x", base_model=str(tmp_path / "nowhere")), tmp_path)


@needs_no_hub
def test_hub_model_fails_fast_offline(tmp_path):
    spec = ModelSpec(name="open_llama_3b", base_model="openlm-research/open_llama_3b")
    t0 = time.monotonic()
    with pytest.raises(modeling.ModelSourceError) as err:
        modeling.resolve_base_model(spec, tmp_path, hub_cache_dir=tmp_path / "hub")
    assert time.monotonic() - t0 < 15
    msg = str(err.value)
    assert msg.startswith("cannot fetch openlm-research/open_llama_3b from the Hugging Face Hub: ")
    assert "\n" not in msg and isinstance(err.value, modeling.PreflightError)


@needs_hub
def test_hub_model_resolves_to_a_pinned_commit(tmp_path):
    spec = ModelSpec(name="tiny-hub", base_model="hf-internal-testing/tiny-random-LlamaForCausalLM")
    got = modeling.resolve_base_model(spec, tmp_path, hub_cache_dir=tmp_path / "hub")
    assert got.source == "hub" and len(got.revision) == 40 and got.arch == "llama"


def test_unreachable_hub_uses_a_cached_snapshot(tmp_path, monkeypatch, tiny):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    spec = ModelSpec(name="b", base_model="someone/tiny-bloom")
    t0 = time.monotonic()
    with pytest.raises(
        modeling.ModelSourceError, match="^cannot fetch someone/tiny-bloom from the Hugging Face Hub"
    ):
        modeling.resolve_base_model(spec, tmp_path, timeout=3, hub_cache_dir=tmp_path / "hub")
    assert time.monotonic() - t0 < 15

    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-bloom"
    snap = repo / "snapshots" / sha
    snap.mkdir(parents=True)
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (snap / f).write_bytes((tiny["bloom"] / f).read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    got = modeling.resolve_base_model(spec, tmp_path, timeout=3, hub_cache_dir=tmp_path / "hub")
    assert got.source == "hub-cache" and got.revision == sha and got.arch == "bloom"
    assert Path(got.path) == snap


def test_weight_patterns_prefer_safetensors():
    both = ["config.json", "model.safetensors", "pytorch_model.bin"]
    assert modeling.resolve._weight_patterns(both) == modeling.resolve._SAFETENSORS_PATTERNS
    assert (
        modeling.resolve._weight_patterns(["pytorch_model-00001-of-00002.bin"])
        == modeling.resolve._BIN_PATTERNS
    )
    assert modeling.resolve._weight_patterns(["config.json", "README.md"]) == []
