"""Loading a causal LM for QLoRA: 4-bit linear layers on every family, training mode, CPU portability.

Traps handled here (transformers 5.x, bitsandbytes, peft):

- Falcon: its linear layers are `FalconLinear(nn.Linear)`, and transformers' bitsandbytes integration only
  replaces modules whose type *is* `nn.Linear`, so a Falcon model asked for 4-bit silently loads with no
  4-bit layer at all. `load_model` builds such families under their `Family.loading_patch()`, and
  `introspection.check_quantized` stops any model where some linear layer stayed unquantized.
- Any model: a model fresh from `from_pretrained` is in eval mode, where gradient checkpointing does nothing;
  `load_model(for_training=True)` calls `.train()`.
- bitsandbytes on CPUs with AVX512-BF16 (most cloud Xeons): the first forward of a `Linear4bit` in eval mode
  without gradients repacks its weight, for good, into an inference-only layout served by a kernel without
  an autograd formula; later *training* forwards then lose the gradient through the frozen weight, and output
  sizes that are not multiples of 32 crash. `load_model` switches that repacking off on every 4-bit layer
  (`keep_4bit_layers_trainable`), so training, evaluation during training and the merge-fidelity comparison
  all run the same dequantize-and-matmul path on every CPU.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline_lib import architectures, devices
from pipeline_lib.config import QuantizationConfig

if TYPE_CHECKING:
    import torch
    from transformers import BitsAndBytesConfig, PreTrainedModel


_DTYPES = ("bfloat16", "float16", "float32")


def torch_dtype(name: str) -> torch.dtype:
    """torch dtype of a `QuantizationConfig.compute_dtype` name."""
    import torch

    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of: {', '.join(_DTYPES)}")
    return getattr(torch, name)


def bnb_config(q: QuantizationConfig) -> BitsAndBytesConfig | None:
    """The bitsandbytes 4-bit config for `q`, or None when 4-bit loading is off."""
    if not q.load_in_4bit:
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=torch_dtype(q.compute_dtype),
    )


def keep_4bit_layers_trainable(model) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference (see the module docstring); undo a
    repacking that already happened. Returns the number of 4-bit layers seen.

    `Linear4bit.forward` repacks only when its `support_avx512bf16_for_cpu` attribute is true (set at
    construction from the CPU's flags), so the attribute is cleared on every 4-bit layer; the packed layout is
    detected from `quant_state.packing_format_for_cpu` and converted back with bitsandbytes' own inverse.
    Weights stay bit-for-bit the same, only the kernel that multiplies them changes."""
    try:
        import bitsandbytes as bnb
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
    except ImportError:  # no bitsandbytes: no 4-bit layers
        return 0
    n = 0
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        n += 1
        module.support_avx512bf16_for_cpu = False
        weight = module.weight
        state = getattr(weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
    return n


def load_model(
    path: str | Path,
    q: QuantizationConfig,
    device: str = "cpu",
    for_training: bool = False,
    gradient_checkpointing: bool = False,
    attn_implementation: str | None = None,
    upcast_fp32: bool = True,
) -> PreTrainedModel:
    """Load a causal LM: linear layers in 4-bit when `q.load_in_4bit`, everything else in `q.compute_dtype`.

    With `for_training` the base is frozen, non-reentrant gradient checkpointing is enabled when asked, and
    the model is put in train mode (without it, it is in eval mode, where checkpointing does nothing). A 4-bit
    model goes through peft's `prepare_model_for_kbit_training`, which also upcasts every non-quantized
    parameter (norms, embeddings, head) to float32 for stable training; `upcast_fp32=False` skips that upcast
    (it doubles the memory of the embeddings, 1.3 GB more for a 250k-token vocabulary like Bloom's).
    """
    from transformers import AutoModelForCausalLM

    quant = bnb_config(q)
    kwargs: dict[str, Any] = dict(dtype=torch_dtype(q.compute_dtype), device_map=devices.device_map(device))
    if quant is not None:
        kwargs["quantization_config"] = quant
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    fam = architectures.family_of(_read_config(path))
    patch = fam.loading_patch() if (quant is not None and fam is not None) else contextlib.nullcontext()
    with patch:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    keep_4bit_layers_trainable(model)
    if not for_training:
        model.eval()
        return model
    gc_kwargs = {"use_reentrant": False}
    if quant is not None and upcast_fp32:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs=gc_kwargs,
        )
    else:
        model.requires_grad_(False)
        if gradient_checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", None)
            if enable is not None:  # transformers >= 5.23 name
                enable(activation_checkpointing_kwargs=gc_kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
    if gradient_checkpointing:
        model.config.use_cache = False
    model.train()
    return model


def is_checkpointing(model) -> bool:
    """Whether gradient (activation) checkpointing is on in any submodule."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def _read_config(path: str | Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(path))
