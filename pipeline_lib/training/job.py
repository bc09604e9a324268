"""The training stage's job: everything one model's QLoRA training needs, as typed plain data.

It crosses a process boundary (`pipeline_lib.isolation`) as JSON, so it holds paths and settings only."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from pipeline_lib.config import ModelSpec, TrainSettings
from pipeline_lib.contracts import ResolvedModel, TokenizedData
from pipeline_lib.tracking import TrackingTarget

PROGRESS_FILE = (
    "progress.json"  # {"step", "max_steps", "epoch"} in the output directory, for progress displays
)


class TrainJob(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: ResolvedModel  # the base model: its local files and identity
    data: TokenizedData  # the tokenized train (and eval) split for this model's tokenizer
    spec: ModelSpec  # what differs per model: epochs, batch size, learning rate, max length ...
    settings: TrainSettings  # what every model shares: training, LoRA, quantization, device
    out_dir: str  # checkpoints, run state, adapter (derived from the inputs: a rerun finds them)
    tracking: TrackingTarget = TrackingTarget(uri=None, experiment="qabot")
    parent_run_id: str | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def learning_rate(self) -> float:
        return self.spec.learning_rate or self.settings.training.learning_rate
