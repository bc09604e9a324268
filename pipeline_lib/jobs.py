"""Plain-data jobs for the stages that run in a process of their own (training, merging).

They map what the previous stages returned (paths, fingerprints) and a slice of the run configuration onto
the keyword arguments of the stage function, so the Prefect tasks stay one call long.
"""

from __future__ import annotations

from pathlib import Path

from pipeline_lib.config import ModelSpec


def train_job(
    model: dict,
    tokenized: dict,
    spec: ModelSpec,
    config: dict,
    parent_run_id: str | None,
    tracking: dict,
    out_dir: Path,
) -> dict:
    """Keyword arguments of `training.TrainJob` for one model."""
    train_stats = tokenized["train"]
    return {
        "model_name": spec.name,
        "base_model": spec.base_model,
        "base_path": model["path"],
        "base_revision": model.get("revision"),
        "base_fingerprint": model["fingerprint"],
        "arch": model["arch"],
        "train_dataset": train_stats["path"],
        "eval_dataset": tokenized["eval"]["path"],
        "data_fingerprint": tokenized["data_fingerprint"],
        "tokenized_fingerprint": tokenized["fingerprint"],
        "out_dir": str(out_dir),
        "spec": spec.model_dump(mode="json"),
        "training": config["training"],
        "lora": config["lora"],
        "quantization": config["quantization"],
        "device": config["device"],
        "tracking_uri": tracking.get("uri"),
        "experiment": tracking["experiment"],
        "parent_run_id": parent_run_id,
        "system_metrics": config["system_metrics"],
        "system_metrics_interval_s": config["system_metrics_interval_s"],
        "use_fast_tokenizer": spec.use_fast_tokenizer,
        "token_stats": {
            **train_stats.get("length_stats", {}),
            "rows": train_stats.get("n_rows"),
            "truncated": train_stats.get("n_truncated"),
            "dropped": train_stats.get("n_dropped"),
        },
    }


def merge_job(
    trained: dict, model: dict, config: dict, tracking: dict, registered_name: str | None, out_dir: Path
) -> dict:
    """Keyword arguments of `merge.merge_stage` for one trained model."""
    return {
        "base_path": model["path"],
        "adapter_dir": trained["adapter_dir"],
        "out_dir": str(out_dir),
        "quantization": config["quantization"],
        "device": config["device"],
        "run_id": trained["run_id"],
        "tracking_uri": tracking.get("uri"),
        "experiment": tracking["experiment"],
        "registered_name": registered_name,
        "log_model": config["log_merged_model"],
    }
