"""Stage jobs as the flow's tasks build them, for tests that call the stages directly."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline_lib.config import LoraSettings, ModelSpec, QuantizationConfig, TrainingSettings, TrainSettings
from pipeline_lib.contracts import ResolvedModel, TokenizedData
from pipeline_lib.tokenization import tokenize_prepared
from pipeline_lib.tracking import TrackingTarget
from pipeline_lib.training import TrainJob


def resolved(arch: str, path: str | Path, name: str | None = None) -> ResolvedModel:
    path = Path(path)
    return ResolvedModel(
        name=name or f"{arch}-tiny",
        base_model=f"tiny:{arch}",
        path=str(path),
        revision=None,
        fingerprint=json.loads((path / "qabot_tiny.json").read_text())["fingerprint"],
        arch=arch,
        source="tiny",
    )


def tokenized(prepared: dict, model_path: str | Path, max_length: int, out_dir: Path, **kw) -> TokenizedData:
    return TokenizedData.model_validate(
        tokenize_prepared(prepared, str(model_path), max_length, out_dir, **kw)
    )


def train_job(
    arch: str,
    model_path: str | Path,
    data: TokenizedData,
    out_dir: Path,
    *,
    uri: str | None = None,
    experiment: str = "qabot-tests",
    name: str | None = None,
    batch_size: int = 4,
    max_length: int = 128,
    epochs: float = 1,
    learning_rate: float = 5e-3,
    training: dict | None = None,
    lora: LoraSettings | None = None,
    system_metrics: bool = False,
    system_metrics_interval_s: float | None = None,
    parent_run_id: str | None = None,
) -> TrainJob:
    spec = ModelSpec(
        name=name or f"{arch}-tiny",
        base_model=f"tiny:{arch}",
        epochs=epochs,
        batch_size=batch_size,
        max_length=max_length,
        learning_rate=learning_rate,
    )
    settings = TrainSettings(
        training=TrainingSettings(**{"warmup_ratio": 0.1, "logging_steps": 1, **(training or {})}),
        lora=lora or LoraSettings(r=8, alpha=16, dropout=0.0),
        quantization=QuantizationConfig(),
        device="cpu",
    )
    return TrainJob(
        model=resolved(arch, model_path, spec.name),
        data=data,
        spec=spec,
        settings=settings,
        out_dir=str(out_dir),
        tracking=TrackingTarget(
            uri=uri,
            experiment=experiment,
            system_metrics=system_metrics,
            system_metrics_interval_s=system_metrics_interval_s,
        ),
        parent_run_id=parent_run_id,
    )
