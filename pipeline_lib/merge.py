"""The merge stage: the adapter merged into an unquantized copy of its base, judged against the same adapter
unmerged (the merge gate), saved, logged and registered. `merge_stage(job) -> MergeResult`."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from pipeline_lib import devices, modeling, tokenization
from pipeline_lib.config import MergeSettings, QuantizationConfig
from pipeline_lib.contracts import MergeResult, ResolvedModel, TrainResult
from pipeline_lib.files import directory_fingerprint, write_json
from pipeline_lib.prompts import build_prompt
from pipeline_lib.tracking import TrackingTarget, make_tracker


class MergeGateError(RuntimeError):
    """The merged model is further from the trained adapter than a correct merge can be."""


class MergeJob(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: ResolvedModel  # the base the adapter was trained on
    trained: TrainResult
    quantization: QuantizationConfig  # how the base was loaded for training
    settings: MergeSettings = MergeSettings()
    heldout_path: str  # the held-out split (JSONL): the gate's texts, in the training template
    device: str = "auto"
    out_dir: str
    tracking: TrackingTarget = TrackingTarget(uri=None, experiment="qabot")
    registered_name: str | None = None  # register the merged model under this name (None: log only)


def fidelity_texts(heldout_path: str | Path, n: int) -> list[str]:
    """The first `n` held-out rows as the model saw rows in training: prompt template + response."""
    texts = []
    with open(heldout_path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                row = json.loads(line)
                texts.append(build_prompt(row["instruction"], row.get("input") or "") + row["output"])
            if len(texts) == n:
                break
    return texts


def gate(report: dict, settings: MergeSettings, name: str) -> list[str]:
    """What is wrong with a merge (empty when it passes), judged on its merge error."""
    err = report["merge_error"]
    problems = []
    if abs(err["loss_delta"]) > settings.max_loss_delta:
        problems.append(
            f"mean token loss moved by {err['loss_delta']:+.4f} nats (limit ±{settings.max_loss_delta})"
        )
    if err["top1_agreement"] < settings.min_top1_agreement:
        problems.append(
            f"top-1 agreement {err['top1_agreement']:.3f} (limit {settings.min_top1_agreement}) with the unmerged adapter"
        )
    return problems


def merge_stage(job: MergeJob) -> MergeResult:
    """Merge, judge the merge (`gate`), save, log, register; a merge beyond the gate's limits fails the stage
    with one line naming the model and what moved (the merged files stay for inspection, unregistered)."""
    device = devices.resolve_device(job.device)
    out = Path(job.out_dir)
    adapter = job.trained.adapter_dir
    s = job.settings
    merge_info = modeling.merge_adapter(job.model.path, adapter, out, dtype=s.dtype, device=device)
    tokenizer = tokenization.load_tokenizer(out)
    texts = fidelity_texts(job.heldout_path, s.fidelity_rows)
    report = modeling.merge_report(
        job.model.path, adapter, out, job.quantization, tokenizer, texts, merged_dtype=s.dtype, device=device
    )
    problems = gate(report, s, job.trained.model_name)
    tracker = make_tracker(job.tracking)
    run_id = job.trained.run_id
    if job.tracking.enabled:
        numbers = {
            f"merge.{part}.{k}": v
            for part in ("merge_error", "quantization_gap")
            for k, v in report[part].items()
            if isinstance(v, (int, float))
        }
        tracker.log_metrics(run_id, {**numbers, "merge.gate_passed": float(not problems)})
        tracker.log_dict(run_id, {"merge": merge_info, **report, "gate_problems": problems}, "merge.json")
    write_json(
        out.parent / f"{out.name}.merge.json", {"merge": merge_info, **report, "gate_problems": problems}
    )
    if problems and s.gate:
        raise MergeGateError(f"{job.trained.model_name}: merge gate failed: " + "; ".join(problems))
    registered = None
    if job.tracking.enabled and job.tracking.log_models:
        registered = tracker.log_model(run_id, out, job.registered_name)
    return MergeResult(
        merged_dir=str(out),
        fingerprint=directory_fingerprint(out),
        merge=merge_info,
        fidelity=report,
        registered=registered,
    )
