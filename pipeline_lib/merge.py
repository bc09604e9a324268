"""Merge a trained adapter into a bf16 copy of its base model, check the merge, log and register it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline_lib.config import QuantizationConfig
from pipeline_lib.tiny import directory_fingerprint
from pipeline_lib.tracking import MlflowTracker, TrackingTarget, make_tracker, write_json

FIDELITY_TEXTS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "What is the capital city of Australia? The capital city of Australia is Canberra.",
    "def add_vectors(a, b):\n    return [x + y for x, y in zip(a, b)]",
]


def merge_stage(
    base_path: str,
    adapter_dir: str,
    out_dir: str,
    quantization: dict,
    device: str = "auto",
    run_id: str | None = None,
    tracking_uri: str | None = None,
    experiment: str = "qabot",
    registered_name: str | None = None,
    log_model: bool = True,
) -> dict[str, Any]:
    """Merge, measure fidelity against the trained (4-bit base + adapter) model, save, log, register."""
    from pipeline_lib import modeling
    from pipeline_lib.training import resolve_device

    device = resolve_device(device)
    q = QuantizationConfig.model_validate(quantization)
    out = Path(out_dir)
    from pipeline_lib.tokenization import load_tokenizer

    merge_info = modeling.merge_adapter(base_path, adapter_dir, out, device=device)
    tokenizer = load_tokenizer(out)
    fidelity = modeling.merge_fidelity(
        base_path, adapter_dir, out, q, tokenizer, FIDELITY_TEXTS, device=device
    )
    result: dict[str, Any] = {
        "merged_dir": str(out),
        "fingerprint": directory_fingerprint(out),
        "merge": merge_info,
        "fidelity": fidelity,
        "registered": None,
    }
    write_json(out.parent / f"{out.name}.merge.json", result)
    tracker = make_tracker(TrackingTarget(tracking_uri, experiment))
    if run_id and isinstance(tracker, MlflowTracker):
        tracker.log_metrics(
            run_id, {f"merge.{k}": v for k, v in fidelity.items() if isinstance(v, (int, float))}
        )
        tracker.log_dict(run_id, {"merge": merge_info, "fidelity": fidelity}, "merge.json")
        if log_model:
            result["registered"] = tracker.register_model_dir(run_id, out, registered_name)
    return result
