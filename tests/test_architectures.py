"""Every entry of `pipeline_lib.architectures.FAMILIES`: its real config is the reference model's, its tiny
config has the structure the tests rely on, and the lookups find it. A new family gets these checks by being
added there (the per-architecture tests elsewhere parametrize over `ARCHS` too)."""

from __future__ import annotations

import pytest
import torch

from pipeline_lib.architectures import ARCHS, FAMILIES, UnknownFamily, dims, family, family_of, packs_exactly

# Published sizes of the report's models (parameters, from their model cards), within 5%.
PUBLISHED_PARAMS = {
    "openlm-research/open_llama_3b": 3.43e9,
    "bigscience/bloom-3b": 3.00e9,
    "tiiuae/falcon-rw-1b": 1.31e9,
}


def _meta_model(config):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("arch", ARCHS)
def test_the_real_config_has_the_reference_models_size(arch):
    fam = FAMILIES[arch]
    assert fam.reference_model in PUBLISHED_PARAMS, "add the published size of the new family's model"
    model = _meta_model(fam.real_config())
    n = sum(p.numel() for p in model.parameters())
    assert abs(n / PUBLISHED_PARAMS[fam.reference_model] - 1) < 0.05, (arch, n)
    d = dims(model.config)
    assert d["vocab_size"] == fam.real["vocab_size"] and d["hidden_size"] == fam.real["hidden_size"]


@pytest.mark.parametrize("arch", ARCHS)
def test_the_tiny_config_keeps_every_linear_size_a_multiple_of_64(arch):
    fam = FAMILIES[arch]
    config = fam.tiny_config(vocab_size=1000, bos=1, eos=2, pad=None)
    with fam.loading_patch():
        model = _meta_model(config)
    assert config.model_type == fam.model_type and family_of(config) is fam
    linears = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and m is not model.get_output_embeddings()
    ]
    assert linears and all(m.in_features % 64 == 0 and m.out_features % 64 == 0 for _, m in linears), [
        (name, m.in_features, m.out_features) for name, m in linears
    ]
    # with the loading patch every linear layer is a plain nn.Linear, the type 4-bit loading replaces
    assert all(type(m) is torch.nn.Linear for _, m in linears)


def test_lookups_by_name_and_model_type():
    for arch, fam in FAMILIES.items():
        assert family(arch) is fam and family(fam.model_type) is fam
    with pytest.raises(UnknownFamily, match="known: llama, bloom, falcon"):
        family("gpt2")

    class Config:
        model_type = "gpt2"
        _attn_implementation = "sdpa"

    assert family_of(Config()) is None and packs_exactly(Config()) is False


@pytest.mark.parametrize(
    ("arch", "impl", "exact"),
    [
        ("llama", "sdpa", True),
        ("llama", "flex_attention", True),
        ("bloom", "sdpa", False),
        ("falcon", "eager", False),
    ],
)
def test_packing_is_exact_only_where_verified(arch, impl, exact):
    config = FAMILIES[arch].tiny_config(vocab_size=1000, bos=1, eos=2, pad=None)
    config._attn_implementation = impl
    assert packs_exactly(config) is exact


def test_tokenizer_advice_follows_the_model_cards():
    assert FAMILIES["llama"].use_fast_advice("openlm-research/open_llama_3b") is False
    assert FAMILIES["llama"].use_fast_advice("meta-llama/Llama-3.2-1B") is None
    assert FAMILIES["bloom"].use_fast_advice("bigscience/bloom-3b") is None


def test_pretraining_batches_take_every_row_once_per_pass_with_little_padding():
    """The tiny models' pre-training batches (`tiny.length_grouped_batches`): a pass over the corpus is a
    permutation of its rows cut into batches of `batch_size`, and rows of similar length share a batch, so
    padding is a small share of the tokens (random batches of this corpus are more than half padding)."""
    import random

    from pipeline_lib.tiny import length_grouped_batches

    rng = random.Random(5)
    lengths = [rng.choice([3, 8, 20, 40, 97]) + rng.randrange(4) for _ in range(4000)]
    batches = length_grouped_batches(lengths, 32, seed=1)
    one_pass = [next(batches) for _ in range(4000 // 32)]
    assert all(len(b) == 32 for b in one_pass)
    assert sorted(i for b in one_pass for i in b) == list(range(4000))
    second = [next(batches) for _ in range(4000 // 32)]
    assert sorted(i for b in second for i in b) == list(range(4000)) and second != one_pass

    def padding(batch_list):
        real = sum(lengths[i] for b in batch_list for i in b)
        return 1 - real / sum(max(lengths[i] for i in b) * len(b) for b in batch_list)

    shuffled = list(range(4000))
    rng.shuffle(shuffled)
    assert padding([shuffled[k : k + 32] for k in range(0, 4000, 32)]) > 0.5
    assert padding(one_pass) < 0.1
