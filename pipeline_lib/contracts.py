"""What crosses a stage boundary: typed, JSON-able records of paths, fingerprints and figures.

Each stage is `pipeline_lib.<stage>.<stage>_stage(job) -> Result`; the results below are what the next stage
(and the comparison) reads. They travel between Prefect tasks (and their cached results) and across the
process boundary of an isolated stage as JSON, so they hold no live objects: no model, no dataset.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Record(BaseModel):
    """A stage result: strict about its fields, JSON in and out."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class ResolvedModel(Record):
    """Where a base model's files are and which exact version they are."""

    name: str  # the model's label in the run (ModelSpec.name)
    base_model: str  # as configured: Hub id, local directory or tiny:FAMILY
    path: str  # local directory of config, tokenizer and weights
    revision: str | None  # commit sha for Hub models; None for tiny and local directories
    fingerprint: str
    arch: str  # config.model_type
    source: str  # "tiny" | "local" | "hub" | "hub-cache"

    def to_dict(self) -> dict[str, Any]:
        return self.to_json()


class LengthStats(Record):
    mean: float = 0.0
    median: float = 0.0
    p90: float = 0.0
    p99: float = 0.0
    max: int = 0


class TokenizedSplit(Record):
    """One split saved by `tokenization.tokenize_split`."""

    path: str
    fingerprint: str
    source: str
    tokenizer: str
    max_length: int
    long_rows: str
    template_version: str
    n_input_rows: int
    n_rows: int
    n_truncated: int
    n_dropped: int
    n_dropped_prompt: int
    n_dropped_long: int
    n_boundary_split: int
    length_stats: LengthStats
    padding_free_tokens: int
    response_bytes: int
    label_tokens: int
    seconds: float
    reused: bool = False


class TokenizedData(Record):
    """The train and eval splits of one model's tokenizer."""

    train: TokenizedSplit
    eval: TokenizedSplit | None  # None: no held-out split (training without evaluation)
    fingerprint: str  # of both splits
    data_fingerprint: str | None  # of the prepared data they came from
    base_model: str | None
    max_length: int
    eval_max_length: int
    long_rows: str


class TrainMetrics(Record):
    """The summary of one training (also logged to its MLflow child run)."""

    train_loss: float
    final_loss: float
    # Held-out split (`pipeline_lib.evaluation`), after fine-tuning and before it (the base model with the
    # adapter at its initialisation, i.e. the base alone, evaluated the same way before the first step).
    eval_loss: float = math.nan
    perplexity: float = math.nan
    bits_per_byte: float = math.nan
    eval_loss_before: float = math.nan
    perplexity_before: float = math.nan
    bits_per_byte_before: float = math.nan
    train_runtime_s: float
    train_tokens: int
    real_tokens_per_s: float
    steps: int
    steps_run: int
    peak_memory_gib: float
    padding_share: float = math.nan
    oom_events: int = 0


class TrainResult(Record):
    model_name: str
    adapter_dir: str
    run_id: str  # the model's MLflow child run ("null-…" when nothing is tracked)
    adapter_fingerprint: str
    base_path: str
    arch: str
    device: str
    metrics: TrainMetrics
    memory_plan: dict[str, Any]
    lora_targets: list[str]
    trainable_params: int = 0
    adapter_check: dict[str, Any]
    quantization: dict[str, Any]
    resumed: bool = False
    resumed_from_step: int = 0
    events: list[dict[str, Any]] = Field(default_factory=list)


class MergeResult(Record):
    merged_dir: str
    fingerprint: str
    merge: dict[str, Any]
    fidelity: dict[str, Any]
    registered: dict[str, Any] | None = None


class AnswerResult(Record):
    """A model's answers to the question set, scored (`pipeline_lib.scoring`)."""

    model_name: str
    phase: str = "after"  # "before" (the base model) or "after" fine-tuning
    answers_path: str
    fingerprint: str
    n_questions: int
    question_score: float | None  # mean score over the questions that have one
    correctness: float | None  # mean over fact, equation, code and list questions
    rubric_coverage: float | None  # mean over open questions: coverage, never correctness
    n_correct: int = 0
    seconds: float
    new_tokens: int


class PromotionResult(Record):
    """What the promotion step decided for one model's registered version (`pipeline_lib.promotion`)."""

    model_name: str
    registered_name: str | None  # the registered model; None when nothing was registered
    version: str | None  # the version judged (alias `challenger`)
    # promoted: it is now `champion`; refused: it is not; unchanged: it already was; pending: it would be,
    # waiting for a reviewer; skipped: nothing to judge (promotion off, tracking off, nothing registered)
    decision: Literal["promoted", "refused", "unchanged", "pending", "skipped"]
    reason: str
    champion: str | None = None  # the version `champion` points at afterwards
    previous_champion: str | None = None  # ... and before
    question_score: float | None = None
    bits_per_byte: float | None = None


class ModelResult(Record):
    """Everything the comparison reads about one model."""

    model_name: str
    base_model: str
    model: ResolvedModel
    tokenized: TokenizedData
    train: TrainResult
    merge: MergeResult
    answers: AnswerResult
    answers_before: AnswerResult | None = None  # the base model's answers, same settings


class Comparison(Record):
    report_dir: str
    files: dict[str, str]
    parent_run_url: str | None = None
    best_model: str | None = None
    scoreboard: list[dict[str, Any]] = Field(default_factory=list)


class RetrainDecision(Record):
    """Whether a run fine-tunes its models, and why (`retraining.decide_retraining`)."""

    train: bool
    reason: str  # one line: "no previous successful run", "data changed (a → b)", ...
    mode: str  # RunConfig.retrain
    data_fingerprint: str
    train_config_fingerprint: str
    previous_run_id: str | None = None  # the last finished run of this config name that trained
    changed: list[str] = Field(default_factory=list)  # "data" and/or the changed settings' keys
