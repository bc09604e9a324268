"""Merging a LoRA adapter into its base, and measuring how far the merged model is from the trained one."""

from __future__ import annotations

import gc
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline_lib import devices
from pipeline_lib.config import QuantizationConfig
from pipeline_lib.files import directory_fingerprint
from pipeline_lib.modeling.errors import PreflightError
from pipeline_lib.modeling.loading import load_model, torch_dtype
from pipeline_lib.modeling.resolve import TOKENIZER_FILES

if TYPE_CHECKING:
    import torch


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the tokenizer's files byte for byte (re-saving could re-convert them)."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def merge_adapter(
    base_path: str | Path,
    adapter_dir: str | Path,
    out_dir: str | Path,
    dtype: torch.dtype | str = "bfloat16",
    device: str = "cpu",
) -> dict[str, Any]:
    """Merge a LoRA adapter into the base loaded in `dtype` (not 4-bit) and save model + tokenizer.

    The base is loaded unquantized on purpose: merging into dequantized 4-bit weights would bake the 4-bit
    rounding error into every merged layer. QLoRA trained the adapter against the 4-bit weights, though, so the
    merged model is not exactly the trained one: `merge_fidelity` measures the difference.
    Falcon needs no `FalconLinear` care here: peft wraps and merges any `nn.Linear` subclass of an unquantized
    model, and the saved parameter names are the base's.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dt = torch_dtype(dtype) if isinstance(dtype, str) else dtype
    out_dir = Path(out_dir)
    base = AutoModelForCausalLM.from_pretrained(
        str(base_path), dtype=dt, device_map=devices.device_map(device)
    )
    base_keys = set(base.state_dict())
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    from peft.tuners.lora import LoraLayer

    merged_layers = sum(isinstance(m, LoraLayer) for m in model.modules())
    merged = model.merge_and_unload(safe_merge=True)
    keys = set(merged.state_dict())
    leftover = sorted(k for k in keys if "lora_" in k or "base_layer" in k)
    if leftover or keys != base_keys:
        odd = leftover[:1] or sorted(keys ^ base_keys)[:1]
        raise PreflightError(f"{base_path}: merge check failed: unexpected parameter {odd[0]}")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    merged.save_pretrained(str(out_dir))
    files = copy_tokenizer_files(base_path, out_dir)
    del merged, model, base
    gc.collect()
    return {
        "merged_dir": str(out_dir),
        "dtype": str(dt).removeprefix("torch."),
        "merged_layers": merged_layers,
        "tokenizer_files": files,
        "bytes": sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file()),
        "fingerprint": directory_fingerprint(out_dir),
    }


def token_logprobs(model, tokenizer, texts: Sequence[str], max_length: int, device: str):
    import torch

    out = []
    dev = devices.torch_device(device)
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)["input_ids"]
            if ids.shape[1] < 2:
                continue
            ids = ids.to(dev)
            logits = model(input_ids=ids).logits[0, :-1].float()
            logp = torch.log_softmax(logits, dim=-1).cpu()
            out.append((logp, ids[0, 1:].cpu()))
    return out


def compare_logprobs(ref, other) -> dict[str, Any]:
    """How far `other`'s next-token log-probabilities are from `ref`'s (both from `token_logprobs` on the
    same texts): the largest and mean absolute difference over every position and vocabulary entry, each
    model's mean token loss and their delta (other - ref), and the share of positions where both predict the
    same next token."""
    if not ref:
        raise PreflightError("merge fidelity needs texts of at least two tokens")
    max_diff, sum_diff, n_cells = 0.0, 0.0, 0
    nll_ref, nll_other, same, n_tok = 0.0, 0.0, 0, 0
    for (lr, tgt), (lo, _) in zip(ref, other, strict=True):
        d = (lr - lo).abs()
        max_diff = max(max_diff, float(d.max()))
        sum_diff += float(d.sum())
        n_cells += d.numel()
        nll_ref -= float(lr.gather(1, tgt[:, None]).sum())
        nll_other -= float(lo.gather(1, tgt[:, None]).sum())
        same += int((lr.argmax(-1) == lo.argmax(-1)).sum())
        n_tok += int(tgt.numel())
    return {
        "texts": len(ref),
        "tokens": n_tok,
        "max_abs_logprob_diff": max_diff,
        "mean_abs_logprob_diff": sum_diff / n_cells,
        "loss_reference": nll_ref / n_tok,
        "loss_merged": nll_other / n_tok,
        "loss_delta": (nll_other - nll_ref) / n_tok,
        "top1_agreement": same / n_tok,
    }


def _adapter_logprobs(base_path, adapter_dir, q: QuantizationConfig, tokenizer, texts, max_length, device):
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_model(base_path, q, device), str(adapter_dir)).eval()
    out = token_logprobs(model, tokenizer, texts, max_length, device)
    del model
    gc.collect()
    return out


def _merged_logprobs(merged_dir, tokenizer, texts, max_length, device):
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(
        str(merged_dir), dtype="auto", device_map=devices.device_map(device)
    ).eval()
    out = token_logprobs(merged, tokenizer, texts, max_length, device)
    del merged
    gc.collect()
    return out


def merge_fidelity(
    base_path: str | Path,
    adapter_dir: str | Path,
    merged_dir: str | Path,
    q: QuantizationConfig,
    tokenizer,
    texts: Sequence[str],
    device: str = "cpu",
    max_length: int = 256,
) -> dict[str, Any]:
    """The merged model (in its saved dtype) against the base loaded per `q` plus the unmerged adapter, on
    `texts` (`compare_logprobs`). With `q` the training's quantization (4-bit for QLoRA) this is the whole
    distance from the model as trained; with `q` the merged dtype it is what merging itself changed."""
    ref = _adapter_logprobs(base_path, adapter_dir, q, tokenizer, texts, max_length, device)
    mer = _merged_logprobs(merged_dir, tokenizer, texts, max_length, device)
    reference = f"{'4-bit' if q.load_in_4bit else q.compute_dtype} base + adapter"
    return {"reference": reference, **compare_logprobs(ref, mer)}


def merge_report(
    base_path: str | Path,
    adapter_dir: str | Path,
    merged_dir: str | Path,
    q: QuantizationConfig,
    tokenizer,
    texts: Sequence[str],
    merged_dtype: str = "bfloat16",
    device: str = "cpu",
    max_length: int = 512,
) -> dict[str, Any]:
    """The merge's two distances, kept apart:

    - `merge_error`: the merged model against the same adapter, unmerged, on the base loaded in the merged
      model's dtype — what merging itself changed (one rounding of W + s·BA). This is what the merge gate
      judges: a wrong merge shows here.
    - `quantization_gap`: the model as trained (the base per `q`, 4-bit for QLoRA, plus the adapter) against
      that unmerged model — what leaving the 4-bit base changes; QLoRA trained against 4-bit weights, so it is
      expected and reported, not judged.
    """
    unquantized = QuantizationConfig(load_in_4bit=False, compute_dtype=merged_dtype)
    plain = _adapter_logprobs(base_path, adapter_dir, unquantized, tokenizer, texts, max_length, device)
    merged = _merged_logprobs(merged_dir, tokenizer, texts, max_length, device)
    trained = (
        _adapter_logprobs(base_path, adapter_dir, q, tokenizer, texts, max_length, device)
        if q.load_in_4bit or q.compute_dtype != merged_dtype
        else plain
    )
    return {
        "merge_error": {"reference": f"{merged_dtype} base + adapter", **compare_logprobs(plain, merged)},
        "quantization_gap": {
            "reference": f"{'4-bit' if q.load_in_4bit else q.compute_dtype} base + adapter",
            **compare_logprobs(trained, plain),
        },
    }
