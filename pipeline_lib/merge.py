"""The merge stage: the adapter merged into a bf16 copy of its base, checked against the trained model,
saved, logged and registered. `merge_stage(job) -> MergeResult`."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from pipeline_lib import devices, modeling, tokenization
from pipeline_lib.config import QuantizationConfig
from pipeline_lib.contracts import MergeResult, ResolvedModel, TrainResult
from pipeline_lib.files import directory_fingerprint, write_json
from pipeline_lib.tracking import TrackingTarget, make_tracker

FIDELITY_TEXTS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "What is the capital city of Australia? The capital city of Australia is Canberra.",
    "def add_vectors(a, b):\n    return [x + y for x, y in zip(a, b)]",
]


class MergeJob(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: ResolvedModel  # the base the adapter was trained on
    trained: TrainResult
    quantization: QuantizationConfig  # how the base was loaded for training (the fidelity reference)
    device: str = "auto"
    out_dir: str
    tracking: TrackingTarget = TrackingTarget(uri=None, experiment="qabot")
    registered_name: str | None = None  # register the merged model under this name (None: log only)


def merge_stage(job: MergeJob) -> MergeResult:
    """Merge, measure fidelity against the trained (4-bit base + adapter) model, save, log, register."""
    device = devices.resolve_device(job.device)
    out = Path(job.out_dir)
    adapter = job.trained.adapter_dir
    merge_info = modeling.merge_adapter(job.model.path, adapter, out, device=device)
    tokenizer = tokenization.load_tokenizer(out)
    fidelity = modeling.merge_fidelity(
        job.model.path, adapter, out, job.quantization, tokenizer, FIDELITY_TEXTS, device=device
    )
    registered = None
    run_id = job.trained.run_id
    tracker = make_tracker(job.tracking)
    if job.tracking.enabled:
        numbers = {f"merge.{k}": v for k, v in fidelity.items() if isinstance(v, (int, float))}
        tracker.log_metrics(run_id, numbers)
        tracker.log_dict(run_id, {"merge": merge_info, "fidelity": fidelity}, "merge.json")
        if job.tracking.log_models:
            registered = tracker.log_model(run_id, out, job.registered_name)
    result = MergeResult(
        merged_dir=str(out),
        fingerprint=directory_fingerprint(out),
        merge=merge_info,
        fidelity=fidelity,
        registered=registered,
    )
    write_json(out.parent / f"{out.name}.merge.json", result.to_json())
    return result
