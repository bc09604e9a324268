"""The one validated configuration of a qabot run.

`RunConfig` is the flow parameter (Prefect renders it as the run form) and the only thing a user edits.
Every field carries a description; fields are checked against each other; small pure functions elsewhere
turn slices of it into library objects (quantization config, LoRA config, TrainingArguments).
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    ValidationError,
    model_validator,
)

from pipeline_lib.config_checks import (  # noqa: F401 (OPTIMIZERS, ConfigError re-exported)
    CUSTOM,
    OPTIMIZERS,
    PROFILES,
    ConfigError,
    _Strict,
    known_optimizer,
    known_profile,
    known_tiny,
    module_names,
)
from pipeline_lib.config_data import CleaningConfig, DataConfig  # noqa: F401 (re-exported)


class QuantizationConfig(_Strict):
    """How the base model is loaded for QLoRA (bitsandbytes)."""

    load_in_4bit: bool = Field(True, description="Load the base model's linear layers in 4-bit (QLoRA).")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type; NF4 is the QLoRA default.")
    double_quant: bool = Field(
        True, description="Quantize the quantization constants too (saves ~0.4 bit/param)."
    )
    compute_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="dtype of the matmuls on dequantized weights and of the non-quantized parts."
    )


class LoraSettings(_Strict):
    """The LoRA adapter trained on top of the frozen base."""

    r: int = Field(16, ge=1, le=1024, description="Rank of the LoRA update matrices.")
    alpha: int = Field(32, ge=1, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA branch.")
    target_modules: Annotated[Literal["all-linear"] | list[str], BeforeValidator(module_names)] = Field(
        "all-linear",
        description=(
            "'all-linear' = every linear layer of the loaded model except the output head; or module names "
            "(q_proj, query_key_value, ...), each matching a linear layer of every model (checked in pre-flight)."
        ),
    )


class ModelSpec(_Strict):
    """One base model to fine-tune and compare, with the settings that differ per model."""

    name: str = Field(
        ..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", description="Short label used in reports."
    )
    base_model: Annotated[str, AfterValidator(known_tiny)] = Field(
        ...,
        description=(
            "Hugging Face model id, a local model directory, or 'tiny:llama' / 'tiny:bloom' / 'tiny:falcon' "
            "for a small model built locally from that architecture's config."
        ),
    )
    revision: str | None = Field(None, description="Model revision on the Hub; None = default branch.")
    epochs: float = Field(
        1.0,
        ge=0.01,
        le=100,
        description="Passes over the data, 0.01 to 100 (fewer: set max_steps; more only make a model recite it).",
    )
    batch_size: int = Field(
        4, ge=1, description="Effective batch size in rows per optimizer step (micro-batch x accumulation)."
    )
    learning_rate: float | None = Field(
        None, gt=0, le=1, description="Peak learning rate (at most 1); None = training.learning_rate."
    )
    max_steps: int | None = Field(
        None, ge=1, description="Stop after this many optimizer steps (overrides epochs)."
    )
    max_length: int = Field(
        512,
        ge=64,
        description=(
            "Longest tokenized row; longer rows are truncated and counted. At least 64: the prompt template "
            "alone takes 30 (tiny tokenizers) to 45 tokens; the tokenize stage stops when too few rows fit."
        ),
    )
    use_fast_tokenizer: bool | None = Field(
        None,
        description="Force the fast or slow tokenizer; None = the architecture's advice (OpenLLaMA: slow).",
    )


class TrainingSettings(_Strict):
    """Settings shared by every model's fine-tuning."""

    learning_rate: float = Field(
        2e-4, gt=0, le=1, description="Default peak learning rate; above 1 every optimizer here diverges."
    )
    warmup_ratio: float = Field(
        0.1, ge=0, lt=1, description="Share of steps spent warming the LR up linearly."
    )
    lr_scheduler: Literal["linear", "cosine", "constant_with_warmup"] = Field(
        "linear", description="LR decay after warmup; the report used linear."
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    optimizer: Annotated[str, AfterValidator(known_optimizer)] = Field(
        "adamw_torch",
        description="transformers optimizer name, e.g. 'adamw_torch' or 'paged_adamw_8bit' (GPU); see OPTIMIZERS.",
    )
    logging_steps: int = Field(1, ge=1, description="Log loss and LR every N optimizer steps.")
    eval_steps: int | None = Field(None, ge=1, description="Evaluate every N steps; None = once per epoch.")
    save_steps: int = Field(
        50, ge=1, description="Checkpoint (adapter, optimizer, scheduler, RNG) every N steps."
    )
    seed: int = Field(42, description="Training seed.")
    gpu_memory_gib: float | None = Field(
        None,
        gt=0,
        description="GPU memory budget; micro-batch, accumulation and checkpointing are chosen to fit it. None = the card's.",
    )
    gradient_checkpointing: Literal["auto", "on", "off"] = Field(
        "auto", description="'auto' turns it on when the memory budget requires it."
    )
    group_by_length: bool = Field(
        True,
        description=(
            "Put rows of similar length in the same optimizer step (and micro-batch) to cut padding; every "
            "step still has exactly the model's batch_size rows."
        ),
    )
    tokens_per_micro_batch: int | None = Field(
        None,
        ge=64,
        description=(
            "Cap on one micro-batch's size in tokens (rows x max_length): the micro-batch is the largest "
            "divisor of batch_size within it, accumulation makes up the rest. None = from the memory budget."
        ),
    )
    loss: Literal["auto", "plain", "chunked"] = Field(
        "auto",
        description=(
            "How the training loss is computed. 'plain': from the model's logits at every position at once "
            "([tokens x vocabulary], plus their float32 copy and gradients). 'chunked': the output head applied "
            "to loss_chunk_tokens label tokens at a time, forward and backward: the same loss and gradients "
            "(up to float32 summation order) without the full logits, for one extra head forward. 'auto': "
            "chunked for vocabularies of 100k tokens or more (bloom's 250k: its logits are the largest part "
            "of a step's memory), plain below (llama's 32k, falcon's 50k)."
        ),
    )
    loss_chunk_tokens: int = Field(
        512,
        ge=16,
        description=(
            "Label tokens per chunk of the chunked loss: the logits held at once are this x vocabulary "
            "(512 x 250k: 0.24 GiB in bf16, 1.7 GiB with the float32 copy and gradients). Smaller saves "
            "memory; much smaller makes each chunk's head matmul bound by reading the head's weights."
        ),
    )
    long_rows: Literal["cut", "drop"] = Field(
        "cut",
        description=(
            "Training rows longer than max_length: 'cut' keeps the prompt and the start of the response "
            "without EOS (never teaching the model to stop mid-answer); 'drop' leaves them out. Counted "
            "either way. Held-out rows are always scored whole."
        ),
    )
    bf16: bool = Field(True, description="Train in bfloat16 autocast where the device supports it.")


class MergeSettings(_Strict):
    """How the adapter is merged into its base, and the gate the merged model must pass.

    The gate judges the *merge error*: the merged model against the same adapter, unmerged, on the base in
    the merged dtype, on held-out rows in the training template (`modeling.merge_report`). Merging rounds
    W + s·BA once to the merged dtype; measured on the tiny models (this CPU, bfloat16): a correct merge moves
    the mean token loss by 0.0008–0.0066 nats and keeps 97–99% of the top-1 predictions. Wrong merges of a
    smoke-trained adapter, measured the same way: the adapter applied twice (loss +0.035, top-1 18%), at half
    scale (+0.57, 40%), missing from one layer (+0.96, 28%), missing everywhere (+2.5, 19%). The limits sit
    between: |loss delta| ≤ 0.02 (3x the largest correct delta) and top-1 agreement ≥ 0.9; the two together
    catch every wrong merge above. The gap between the model as trained (4-bit base) and the merged one is
    reported beside it (for the tiny models: top-1 agreement ~0.8, the 4-bit rounding of 64-wide layers),
    never judged: QLoRA trains against 4-bit weights, and serving an unquantized merge is the report's choice.
    """

    dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="dtype of the merged model (the base is loaded unquantized in it)."
    )
    fidelity_rows: int = Field(
        8,
        ge=1,
        le=256,
        description="Held-out rows (prompt + response, training template) the gate compares on.",
    )
    max_loss_delta: float = Field(
        0.03,
        gt=0,
        description="Largest |mean token loss change| (nats) merging may cause; see the class docs.",
    )
    min_top1_agreement: float = Field(
        0.9, ge=0, le=1, description="Smallest share of positions where merged and unmerged predict alike."
    )
    gate: bool = Field(
        True, description="Fail the model's merge step when the merge error is beyond the limits."
    )


class InferenceSettings(_Strict):
    """How each model answers the question set, before fine-tuning (the base) and after (the merged model)."""

    question_set: str | None = Field(
        None,
        description=(
            "Question set markdown file, or 'builtin:NAME' for one shipped with qabot "
            "(builtin:smoke_question_set.md); None = the report's 15 questions."
        ),
    )
    max_new_tokens: int = Field(128, ge=1, le=4096, description="Longest answer in tokens.")
    batch_size: int = Field(16, ge=1, description="Questions answered in one generate() call.")
    do_sample: bool = Field(False, description="Sample instead of greedy decoding.")
    temperature: float = Field(0.7, gt=0, description="Sampling temperature (only with do_sample).")
    repetition_penalty: float = Field(1.1, ge=1.0, description="Penalty on repeated tokens.")


class TrackingSettings(_Strict):
    """Where and how runs are recorded."""

    experiment: str = Field("qabot", min_length=1, description="MLflow experiment name.")
    register_models: bool = Field(
        True, description="Register each merged model in the MLflow model registry."
    )
    system_metrics: bool = Field(True, description="Sample CPU/GPU/memory with MLflow system metrics.")
    system_metrics_interval_s: float = Field(
        10.0, ge=0.5, description="Seconds between system-metric samples (GPU utilisation through pynvml)."
    )
    log_merged_model: bool = Field(True, description="Upload the merged model directory as a run artifact.")


class PromotionSettings(_Strict):
    """When a newly registered merged model becomes the registry's `champion` (`pipeline_lib.promotion`).

    Every registered version of a model gets the alias `challenger` after its answers; it takes the alias
    `champion` when its question score is at least the champion's and its held-out bits per byte are not worse
    (higher) than the champion's by more than `bpb_margin`. The first version of a model becomes champion."""

    enabled: bool = Field(
        True,
        description=(
            "Judge each newly registered merged model against the registry's champion and move the "
            "'challenger' and 'champion' aliases (needs tracking.register_models)."
        ),
    )
    bpb_margin: float = Field(
        0.02,
        ge=0,
        description=(
            "How much higher (worse) a challenger's held-out bits per byte may be than the champion's, in "
            "absolute bits per byte, for it to still become champion."
        ),
    )
    approval: bool = Field(
        False,
        description="Pause the run for a reviewer's yes/no in the Prefect UI before moving 'champion'.",
    )
    approval_timeout_s: int = Field(
        3600,
        ge=1,
        description="Seconds to wait for the reviewer; no answer by then means the model is not promoted.",
    )


class TrainSettings(_Strict):
    """The settings every model's training, merge and answers share (`RunConfig.train_settings()`)."""

    training: TrainingSettings = Field(
        default_factory=TrainingSettings, description="Shared training settings."
    )
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA adapter.")
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig, description="4-bit loading.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="'auto' = CUDA when present, else CPU."
    )
    process_isolation: Literal["auto", True, False] = Field(
        "auto", description="Each stage holding a model in a process of its own ('auto' = on a GPU only)."
    )


class RunConfig(_Strict):
    """A whole fine-tune-and-compare run: data, models, training, inference and tracking."""

    name: str = Field("qabot", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", description="Run name prefix.")
    profile: Annotated[str, AfterValidator(known_profile)] = Field(
        CUSTOM,
        description=(
            "The preset this config starts from, 'smoke' or 'report' (the settings given apply over it), or "
            "'custom' for none; recorded as the MLflow tag qabot.profile."
        ),
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="'auto' = CUDA when present, else CPU."
    )
    process_isolation: Literal["auto", True, False] = Field(
        "auto",
        description=(
            "Train/merge/answer each model in a process of its own, so its GPU memory is surely released "
            "before the next model starts; 'auto' = on a GPU only (on the CPU it would only cost the ~10 s "
            "of importing torch, transformers, peft and bitsandbytes per stage)."
        ),
    )
    data: DataConfig = Field(default_factory=DataConfig, description="Instruction data.")
    # Not required by the schema (a default, checked below): a deployment's parameter `{profile: smoke}` must pass
    # the Prefect server's check against this schema before the preset fills in its models.
    models: list[ModelSpec] = Field(
        default_factory=list,
        description="Base models, fine-tuned one after another (the profile's when not given).",
    )
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig, description="4-bit loading.")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA adapter.")
    training: TrainingSettings = Field(
        default_factory=TrainingSettings, description="Shared training settings."
    )
    merge: MergeSettings = Field(default_factory=MergeSettings, description="Merging and its gate.")
    inference: InferenceSettings = Field(default_factory=InferenceSettings, description="Question answering.")
    tracking: TrackingSettings = Field(default_factory=TrackingSettings, description="MLflow tracking.")
    promotion: PromotionSettings = Field(
        default_factory=PromotionSettings, description="Promotion through the model registry's aliases."
    )
    retrain: Literal["always", "on_change"] = Field(
        "always",
        description=(
            "'always' = fine-tune on every run; 'on_change' = skip it, saying why, when the data and the training "
            "settings (pipeline_lib/retraining.py) equal those of this config name's last finished trained run."
        ),
    )
    refresh_comparison: bool = Field(
        True,
        description="When training is skipped: rebuild the comparison from that run's results; false = link to it.",
    )

    @model_validator(mode="before")
    @classmethod
    def _start_from_preset(cls, data: Any) -> Any:
        """`profile: smoke|report` plus a few overrides means: that preset, with those overrides."""
        if isinstance(data, dict) and data.get("profile") in PROFILES:
            return _deep_merge(yaml.safe_load(profile_text(data["profile"])), data)
        return data

    @model_validator(mode="after")
    def _cross_checks(self) -> RunConfig:
        if not self.models:
            raise ValueError(
                "models: at least one model is needed (or a profile that has them: smoke, report)"
            )
        names = [m.name for m in self.models]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"models: names must be unique, repeated: {', '.join(dup)}")
        if self.device == "cpu" and self.quantization.compute_dtype == "float16":
            raise ValueError("quantization.compute_dtype: float16 is not supported on the CPU; use bfloat16")
        if self.training.optimizer.startswith("paged_") and self.device == "cpu":
            raise ValueError("training.optimizer: paged optimizers need CUDA; use adamw_torch on the CPU")
        return self

    def lr_for(self, spec: ModelSpec) -> float:
        return spec.learning_rate or self.training.learning_rate

    def train_settings(self) -> TrainSettings:
        """The slice of this config that decides each model's training, merge and answers: their cache keys
        and output directories (tracking settings are not in it: where results are logged changes nothing)."""
        return TrainSettings(
            training=self.training,
            lora=self.lora,
            quantization=self.quantization,
            device=self.device,
            process_isolation=self.process_isolation,
        )

    def model(self, name: str) -> ModelSpec:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)


def qabot_home() -> Path:
    """Where all state lives: $QABOT_HOME, default ./.qabot."""
    return Path(os.environ.get("QABOT_HOME", ".qabot")).resolve()


def _format_validation_error(err: ValidationError, where: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"].removeprefix("Value error, ")
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{where}: {loc}: {msg}{more}"


def profile_text(profile: str) -> str:
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; choose one of: {', '.join(PROFILES)}")
    return resources.files("pipeline_lib.profiles").joinpath(f"{profile}.yaml").read_text()


def parse_config(data: Any, where: str = "config") -> RunConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of settings, got {type(data).__name__}")
    try:  # on its own: the other errors of a config whose preset is unknown are noise
        known_profile(data.get("profile", CUSTOM))
    except ValueError as err:
        raise ConfigError(f"{where}: profile: {err}") from None
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, where)) from None


def load_config(
    profile: str | None = None, path: str | os.PathLike | None = None, *, force_profile: bool = False
) -> RunConfig:
    """Load a preset (`profile`) or a YAML/JSON file (`path`); a file may start from a preset with `profile:`.
    With a file, `profile` applies where the file names none, or replaces its own with `force_profile`."""
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            data = yaml.safe_load(p.read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            at = f" (line {mark.line + 1})" if mark else ""
            raise ConfigError(f"{p}: not valid YAML{at}") from None
        if profile is not None and isinstance(data, dict):
            data = {**data, "profile": profile} if force_profile else {"profile": profile, **data}
        return parse_config(data, str(p))
    name = profile or "smoke"
    return parse_config(yaml.safe_load(profile_text(name)), f"profile {name}")


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
