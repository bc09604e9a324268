"""LoRA on a loaded model: targets, the peft config, its report, and the check of a saved adapter."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline_lib.config import LoraSettings
from pipeline_lib.modeling.errors import PreflightError
from pipeline_lib.modeling.introspection import (
    _base_linear_modules,
    _matches,
    _model_label,
    _unquantized_numel,
    lora_target_modules,
)
from pipeline_lib.netutil import one_line

if TYPE_CHECKING:
    import torch


def check_lora_targets(model, targets: Sequence[str], model_name: str | None = None) -> dict[str, int]:
    """How many linear layers each target names; PreflightError if one names none."""
    names = [n for n, _ in _base_linear_modules(model)]
    counts = {t: sum(_matches(n, t) for n in names) for t in targets}
    for t, c in counts.items():
        if c == 0:
            raise PreflightError(f"LoRA target {t!r} matches no module of {_model_label(model, model_name)}")
    return counts


def lora_config(settings: LoraSettings, targets: Sequence[str], model=None, model_name: str | None = None):
    """peft LoraConfig (causal LM, no bias training) on `targets`; checked against `model` when given."""
    from peft import LoraConfig

    targets = list(targets)
    if not targets:
        raise PreflightError(f"{_model_label(model, model_name)}: no LoRA target modules")
    if model is not None:
        check_lora_targets(model, targets, model_name)
    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )


def resolve_lora_targets(model, settings: LoraSettings, model_name: str | None = None) -> list[str]:
    """`settings.target_modules` for `model`: 'all-linear' resolved, or the explicit list checked."""
    if settings.target_modules == "all-linear":
        return lora_target_modules(model)
    targets = list(settings.target_modules)
    check_lora_targets(model, targets, model_name)
    return targets


def lora_report(peft_model, model_name: str | None = None, adapter_name: str = "default") -> dict[str, Any]:
    """LoRA targets, layers wrapped per target, trainable parameters and their share.

    Raises PreflightError when nothing is trainable or a target wrapped no layer.
    """
    from peft.tuners.lora import LoraLayer

    label = _model_label(peft_model, model_name)
    cfg = peft_model.peft_config[adapter_name]
    lora_layers = [n for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)]
    raw = cfg.target_modules
    if isinstance(raw, str):
        targets = [raw]
        counts = {raw: sum(bool(re.fullmatch(raw, n)) for n in lora_layers)}
    else:
        targets = sorted(raw or [])
        counts = {t: sum(_matches(n, t) for n in lora_layers) for t in targets}
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(_unquantized_numel(p) for p in peft_model.parameters())
    trainable_other = [n for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" not in n]
    report = {
        "targets": targets,
        "layers_per_target": counts,
        "lora_layers": len(lora_layers),
        "r": cfg.r,
        "alpha": cfg.lora_alpha,
        "dropout": cfg.lora_dropout,
        "trainable_params": int(trainable),
        "total_params": int(total),
        "trainable_share": trainable / total if total else 0.0,
        "trainable_non_lora": trainable_other[:20],
    }
    if trainable == 0:
        raise PreflightError(f"{label}: LoRA check failed: no trainable parameters")
    for t, c in counts.items():
        if c == 0:
            raise PreflightError(f"LoRA target {t!r} matches no module of {label}")
    return report


def snapshot_lora(peft_model) -> dict[str, torch.Tensor]:
    """CPU copies of the adapter weights, keyed as `save_pretrained` writes them."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().to("cpu").clone() for k, v in get_peft_model_state_dict(peft_model).items()}


_ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def _load_adapter_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    import torch

    return torch.load(str(path), map_location="cpu", weights_only=True)


def check_adapter(
    adapter_dir: str | Path, initial: dict[str, torch.Tensor] | None = None, model_name: str | None = None
) -> dict[str, Any]:
    """After `save_pretrained`: the adapter file exists, holds finite lora_A/lora_B tensors for every target,
    and training moved it away from its initialisation (lora_B starts at zero, so some lora_B must be
    non-zero; with `initial` from `snapshot_lora`, at least one tensor must differ from it).
    """
    import torch

    adapter_dir = Path(adapter_dir)
    cfg_path = adapter_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    label = model_name or cfg.get("base_model_name_or_path") or str(adapter_dir)
    file = next((adapter_dir / f for f in _ADAPTER_FILES if (adapter_dir / f).is_file()), None)
    if file is None:
        raise PreflightError(f"{label}: adapter check failed: no adapter file in {adapter_dir}")
    size = file.stat().st_size
    try:
        tensors = _load_adapter_tensors(file) if size else {}
    except Exception as err:  # a truncated or corrupt file
        raise PreflightError(
            f"{label}: adapter check failed: cannot read {file.name}: {one_line(err)}"
        ) from None
    a_keys = sorted(k for k in tensors if "lora_A" in k)
    b_keys = sorted(k for k in tensors if "lora_B" in k)
    if not a_keys or not b_keys or any(t.numel() == 0 for t in tensors.values()):
        raise PreflightError(
            f"{label}: adapter saved empty ({file.name}: {len(tensors)} tensors, {size} bytes)"
        )
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise PreflightError(f"{label}: adapter check failed: non-finite values in {bad[0]}")
    raw = cfg.get("target_modules")
    targets = [raw] if isinstance(raw, str) else sorted(raw or [])
    missing = []
    if not isinstance(raw, str):  # a list of names (a string is a regular expression)
        missing = [
            t for t in targets if not any(re.search(rf"(^|\.){re.escape(t)}\.lora_A", k) for k in a_keys)
        ]
    if missing:
        raise PreflightError(f"{label}: adapter check failed: no LoRA weights for target {missing[0]!r}")
    b_max = max(float(tensors[k].abs().max()) for k in b_keys)
    changed: list[str] = []
    if initial:
        absent = [k for k in initial if k not in tensors]
        if absent:
            raise PreflightError(f"{label}: adapter check failed: saved adapter lacks {absent[0]}")
        changed = [k for k, t in initial.items() if not torch.equal(tensors[k].to(t.dtype).cpu(), t)]
    if b_max == 0.0 or (initial and not changed):
        raise PreflightError(f"{label}: adapter unchanged from initialisation ({file.name})")
    return {
        "file": file.name,
        "bytes": size,
        "tensors": len(tensors),
        "lora_A": len(a_keys),
        "lora_B": len(b_keys),
        "targets": targets,
        "lora_B_max_abs": b_max,
        "changed_tensors": len(changed) if initial else None,
        "compared_tensors": len(initial) if initial else 0,
    }
