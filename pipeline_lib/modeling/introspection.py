"""What a loaded model is made of: its linear layers (LoRA targets), and which of them are 4-bit."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

from pipeline_lib.modeling.errors import PreflightError


def _linear_types() -> tuple[type, ...]:
    import torch
    from transformers.pytorch_utils import Conv1D

    types: list[type] = [torch.nn.Linear, Conv1D]
    with contextlib.suppress(ImportError):
        import bitsandbytes as bnb

        types += [bnb.nn.Linear4bit, bnb.nn.Linear8bitLt]
    return tuple(types)


def _output_head(model) -> Any:
    get = getattr(model, "get_output_embeddings", None)
    with contextlib.suppress(Exception):
        return get() if get else None
    return None


def _base_linear_modules(model) -> Iterator[tuple[str, Any]]:
    """(name, module) of every linear layer of the base model except the output head.

    On a peft model the wrapped `base_layer` is reported under its wrapper's name and the LoRA matrices
    themselves are skipped.
    """
    types = _linear_types()
    head = _output_head(model)
    for name, module in model.named_modules():
        parts = name.split(".")
        if any(p.startswith("lora_") for p in parts):
            continue
        if module is head or parts[-1] == "lm_head":
            continue
        if isinstance(module, types):
            if parts[-1] == "base_layer":
                name = ".".join(parts[:-1])
            yield name, module


def _model_label(model, model_name: str | None) -> str:
    if model_name:
        return model_name
    cfg = getattr(model, "config", None)
    return str(getattr(cfg, "_name_or_path", None) or getattr(cfg, "model_type", None) or "model")


def lora_target_modules(model) -> list[str]:
    """Short names (q_proj, query_key_value, ...) of every linear layer of the loaded model but the head."""
    return sorted({name.rsplit(".", 1)[-1] for name, _ in _base_linear_modules(model)})


def _matches(module_name: str, target: str) -> bool:
    return module_name == target or module_name.endswith("." + target)


def _unquantized_numel(param) -> int:
    """Element count of a parameter before quantization (a 4-bit parameter packs two values per byte)."""
    qs = getattr(param, "quant_state", None)
    if qs is not None and getattr(qs, "shape", None) is not None:
        return int(math.prod(qs.shape))
    return int(param.numel())


def quantization_report(model) -> dict[str, Any]:
    """Which linear layers are 4-bit, and the memory it saves.

    linear_layers / linear_4bit / share_4bit: linear layers other than the output head, and how many are
    bitsandbytes `Linear4bit`; not_4bit: up to 20 names of the others; footprint_bytes:
    `model.get_memory_footprint()`; bf16_footprint_bytes: 2 bytes per unquantized parameter; ratio:
    footprint / bf16 estimate; params: the unquantized parameter count.
    """
    try:
        import bitsandbytes as bnb

        four_bit: tuple[type, ...] = (bnb.nn.Linear4bit,)
    except ImportError:
        four_bit = ()
    linear = list(_base_linear_modules(model))
    quantized = [n for n, m in linear if four_bit and isinstance(m, four_bit)]
    not_4bit = [n for n, m in linear if not (four_bit and isinstance(m, four_bit))]
    params = sum(_unquantized_numel(p) for p in model.parameters())
    footprint = int(model.get_memory_footprint())
    bf16 = 2 * params
    kinds = sorted({type(m).__name__ for _, m in linear})
    quant_types = sorted(
        {str(getattr(m.weight, "quant_type", "")) for _, m in linear if four_bit and isinstance(m, four_bit)}
    )
    return {
        "arch": str(getattr(getattr(model, "config", None), "model_type", "unknown")),
        "linear_layers": len(linear),
        "linear_4bit": len(quantized),
        "share_4bit": len(quantized) / len(linear) if linear else 0.0,
        "not_4bit": not_4bit[:20],
        "linear_kinds": kinds,
        "quant_types": [t for t in quant_types if t],
        "params": params,
        "footprint_bytes": footprint,
        "bf16_footprint_bytes": bf16,
        "ratio": footprint / bf16 if bf16 else math.nan,
    }


def check_quantized(report: dict[str, Any], model_name: str, expected: bool = True) -> None:
    """Every linear layer but the head must be 4-bit when 4-bit was requested (and none when it was not)."""
    n, n4 = report["linear_layers"], report["linear_4bit"]
    if expected:
        if n == 0:
            raise PreflightError(f"{model_name}: quantization check failed: no linear layers found")
        if report["share_4bit"] < 1.0:
            shown = ", ".join(report["not_4bit"][:3])
            kinds = ", ".join(report.get("linear_kinds", []))
            raise PreflightError(
                f"{model_name}: quantization check failed: only {n4}/{n} linear layers are 4-bit "
                f"(not 4-bit: {shown}{', ...' if n - n4 > 3 else ''}; layer types: {kinds})"
            )
    elif n4:
        raise PreflightError(
            f"{model_name}: quantization check failed: {n4}/{n} linear layers are 4-bit but 4-bit was not requested"
        )


def linear_layer_names(model_config) -> list[str]:
    """Full names of the linear layers `lora_target_modules` would see, from a model built on the meta device
    from `model_config` (no weights read, no memory used): what pre-flight checks LoRA targets against."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    return [name for name, _ in _base_linear_modules(model)]
