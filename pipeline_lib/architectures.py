"""Everything qabot knows about each model family, in one entry per family.

A `Family` holds what differs between Llama, Bloom and Falcon: the report's reference model and its real
dimensions, the small config the tests and the smoke preset build, the special-token behaviour its tiny
tokenizer copies, which attention implementations pack rows exactly, whether its linear layers need the
4-bit loading patch, and the model card's tokenizer advice. Adding a family is one entry in `FAMILIES` plus
its tests (tests/test_architectures.py runs every entry).

Config attribute names are the same for every family here (transformers maps Bloom's `n_layer`/`n_head` to
`num_hidden_layers`/`num_attention_heads`), so `dims(config)` reads one set of names.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

TINY_HIDDEN = 64
TINY_LAYERS = 2
TINY_HEADS = 4
TINY_INTERMEDIATE = (
    192  # llama's gated MLP (open_llama_3b: 8640 = 2.7 x 3200); Bloom and Falcon use 4 x hidden
)


@dataclass(frozen=True)
class Family:
    name: str  # also the `tiny:NAME` id
    model_type: str  # config.model_type
    reference_model: str  # the report's model of this family (Hugging Face id)
    real: dict[str, Any]  # that model's config values (config.json), for memory plans and GPU checks
    specials: dict[str, Any]  # special tokens of its tokenizer, copied by the tiny tokenizer
    exact_packing: frozenset[str]  # attention implementations where packed rows never see each other
    needs_linear_patch: bool = False  # its linear layers are subclasses transformers' 4-bit loading skips
    slow_tokenizer_ids: tuple[str, ...] = ()  # Hub ids whose card advises against the fast tokenizer
    tiny_extra: dict[str, Any] = field(default_factory=dict)  # family-specific settings of the tiny config

    def config_class(self):
        from transformers import AutoConfig

        return type(AutoConfig.for_model(self.model_type))

    def real_config(self):
        """The reference model's config (dimensions, special-token ids), without its weights."""
        return self.config_class()(**self.real)

    def tiny_config(self, vocab_size: int, bos: int | None, eos: int | None, pad: int | None):
        """A small config with the reference model's structure; every linear size a multiple of 64."""
        dims = dict(hidden_size=TINY_HIDDEN, num_hidden_layers=TINY_LAYERS, num_attention_heads=TINY_HEADS)
        ids = dict(vocab_size=vocab_size, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
        return self.config_class()(**dims, **self.tiny_extra, **ids)

    def use_fast_advice(self, base_model: str) -> bool | None:
        """False where the model card advises against the fast tokenizer, None where it gives no advice."""
        return False if any(s in base_model.lower() for s in self.slow_tokenizer_ids) else None

    @contextlib.contextmanager
    def loading_patch(self) -> Iterator[None]:
        """While active, the family is built so that 4-bit loading reaches every linear layer."""
        if not self.needs_linear_patch:
            yield
            return
        with _falcon_linear_as_nn_linear():
            yield


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            name="llama",
            model_type="llama",
            reference_model="openlm-research/open_llama_3b",
            real=dict(
                vocab_size=32000,
                hidden_size=3200,
                intermediate_size=8640,
                num_hidden_layers=26,
                num_attention_heads=32,
                max_position_embeddings=2048,
                rms_norm_eps=1e-6,
                bos_token_id=1,
                eos_token_id=2,
                pad_token_id=0,
            ),  # fmt: skip
            # `<s>` BOS prepended, `</s>` EOS, no pad token (OpenLLaMA)
            specials={"bos": "<s>", "eos": "</s>", "unk": "<unk>", "pad": None, "add_bos": True},
            # transformers builds a per-row causal mask from restarting position_ids when no attention mask
            # and no cache are passed, and rotary embeddings read the same position_ids (tests/test_batching.py)
            exact_packing=frozenset({"eager", "sdpa", "flex_attention"}),
            # OpenLLaMA's card: the auto-converted fast tokenizer gave wrong tokenizations
            slow_tokenizer_ids=("open_llama",),
            tiny_extra=dict(
                intermediate_size=TINY_INTERMEDIATE,
                num_key_value_heads=TINY_HEADS,
                max_position_embeddings=2048,
                tie_word_embeddings=False,
            ),  # fmt: skip
        ),
        Family(
            name="bloom",
            model_type="bloom",
            reference_model="bigscience/bloom-3b",
            real=dict(vocab_size=250880, hidden_size=2560, n_layer=30, n_head=32),
            # `<pad>` pad token, `</s>` EOS, no BOS prepended
            specials={"bos": "<s>", "eos": "</s>", "unk": "<unk>", "pad": "<pad>", "add_bos": False},
            # ALiBi: the forward never passes position_ids to the mask builder, so packed rows see each other
            exact_packing=frozenset(),
        ),
        Family(
            name="falcon",
            model_type="falcon",
            reference_model="tiiuae/falcon-rw-1b",
            real=dict(
                vocab_size=50304,
                hidden_size=2048,
                num_hidden_layers=24,
                num_attention_heads=32,
                alibi=True,
                new_decoder_architecture=False,
                multi_query=False,
                parallel_attn=False,
                bias=True,
                bos_token_id=1,
                eos_token_id=2,
            ),  # fmt: skip
            # GPT-2 BPE: `<|endoftext|>` is BOS, EOS and UNK, no pad token
            specials={
                "bos": "<|endoftext|>",
                "eos": "<|endoftext|>",
                "unk": "<|endoftext|>",
                "pad": None,
                "add_bos": False,
            },  # fmt: skip
            exact_packing=frozenset(),  # ALiBi, as Bloom
            # `FalconLinear(nn.Linear)`: transformers replaces only modules whose type *is* nn.Linear
            needs_linear_patch=True,
            tiny_extra=dict(
                alibi=True,
                bias=True,
                new_decoder_architecture=False,
                multi_query=False,
                parallel_attn=False,
                max_position_embeddings=2048,
            ),  # fmt: skip
        ),
    )
}
ARCHS: tuple[str, ...] = tuple(FAMILIES)


class UnknownFamily(ValueError):
    pass


def family(name_or_type: str) -> Family:
    """The entry for a family name or a `config.model_type`."""
    for f in FAMILIES.values():
        if name_or_type in (f.name, f.model_type):
            return f
    raise UnknownFamily(f"unknown model family {name_or_type!r}; known: {', '.join(ARCHS)}")


def family_of(config) -> Family | None:
    """The entry for a loaded model's config, None for a family qabot has no entry for."""
    try:
        return family(getattr(config, "model_type", "") or "")
    except UnknownFamily:
        return None


def dims(config) -> dict[str, Any]:
    """The sizes the memory plan needs, read from a model config."""
    return {
        "hidden_size": int(config.hidden_size),
        "num_layers": int(config.num_hidden_layers),
        "vocab_size": int(config.vocab_size),
        "num_heads": int(config.num_attention_heads),
        "eager_attention": getattr(config, "_attn_implementation", "eager") == "eager",
    }


def chunked_loss_exact(config) -> bool:
    """Whether the model's logits are exactly its output head applied to its decoder's output,
    `get_output_embeddings()(get_decoder()(...)[0])`, with no scaling, soft-capping or layer between, which
    the chunked training loss (`training.loss`) relies on. True for every family here (LlamaForCausalLM,
    BloomForCausalLM, FalconForCausalLM: `lm_head` on the final-norm output of `model`/`transformer`, tied or
    not; tests/test_loss.py compares each with the model's own logits), False for families without an entry."""
    return family_of(config) is not None


def packs_exactly(config) -> bool:
    """Whether rows packed through position_ids give each row the same logits as alone, for this config's
    family and attention implementation (False for families and implementations not verified)."""
    fam = family_of(config)
    return fam is not None and getattr(config, "_attn_implementation", None) in fam.exact_packing


_PATCH_LOCK = threading.Lock()


@contextlib.contextmanager
def _falcon_linear_as_nn_linear() -> Iterator[None]:
    """Falcon built with `torch.nn.Linear` where it would use `FalconLinear` (`x @ W.T + b`, the same function
    and parameter names, so checkpoints load unchanged), so 4-bit loading replaces every linear layer."""
    import torch
    from transformers.models.falcon import modeling_falcon

    with _PATCH_LOCK:
        original = modeling_falcon.FalconLinear
        modeling_falcon.FalconLinear = torch.nn.Linear
        try:
            yield
        finally:
            modeling_falcon.FalconLinear = original
