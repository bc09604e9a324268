"""The data section of the run configuration (`RunConfig.data`): where the instruction rows come from, how
they are downloaded, cleaned and split. Re-exported by `pipeline_lib.config`."""

from __future__ import annotations

from pydantic import Field, field_validator

from pipeline_lib.config_checks import _Strict


class CleaningConfig(_Strict):
    """Switches for the named cleaning rules (each rule is on unless switched off)."""

    strip_control_chars: bool = Field(
        True, description="Repair: remove control and stray escape characters, trim surrounding whitespace."
    )
    normalize_empty_input: bool = Field(
        True,
        description="Repair: turn '<noinput>', 'No input', 'N/A' and similar placeholder inputs into ''.",
    )
    cut_merged_instructions: bool = Field(
        True, description="Repair: cut an output that runs on into a following '##' numbered instruction."
    )
    drop_empty_output: bool = Field(True, description="Drop: rows whose output is empty after cleaning.")
    drop_na_output: bool = Field(True, description="Drop: rows whose output is just 'N/A' or similar.")
    drop_nooutput: bool = Field(
        True,
        description=(
            "Drop: '<nooutput>' / '<No Output>' answers and stock refusals to make images "
            "(mostly image-generation requests)."
        ),
    )
    drop_hallucination_bait: bool = Field(
        True, description="Drop: inputs that are only a URL or a placeholder such as '<Picture Attached>'."
    )
    drop_empty_code: bool = Field(
        True, description="Drop: instructions asking for code whose output contains no code."
    )
    drop_unclear_instruction: bool = Field(
        True,
        description="Drop: instructions without at least two letters, or only a placeholder or a URL.",
    )
    drop_missing_input: bool = Field(
        True,
        description="Drop: instructions pointing at content ('the following sentence') when the input is empty.",
    )
    drop_duplicates: bool = Field(
        True, description="Drop: exact and normalised (case, whitespace, punctuation) duplicate rows."
    )


class DataConfig(_Strict):
    """Where the instruction data comes from and how it is split."""

    source: str = Field(
        "tatsu-lab/alpaca",
        description=(
            "Alpaca-format data: a local JSON/JSONL file, an http(s) URL, a Hugging Face dataset id "
            "('owner/name' or 'hf://owner/name'), or 'builtin:NAME' for a file shipped with qabot."
        ),
    )
    revision: str | None = Field(
        None, description="Dataset revision (Hugging Face ids only); None = default branch."
    )
    sha256: str | None = Field(
        None, description="Expected sha256 of the downloaded file (URLs); a mismatch stops the run."
    )
    eval_fraction: float = Field(
        0.02, gt=0.0, lt=0.5, description="Share of the cleaned rows held out for evaluation loss."
    )
    max_rows: int | None = Field(
        None,
        ge=10,
        description="Keep only this many cleaned rows (seeded sample) for quick runs; None = all.",
    )
    seed: int = Field(42, description="Seed of the train/eval split and of any sampling.")
    max_download_mb: float = Field(
        2048,
        gt=0,
        description=(
            "Largest data file that may be downloaded (URLs, Hugging Face files), in MB of 2^20 bytes; a larger "
            "one stops the run before it is read."
        ),
    )
    download_timeout_s: float = Field(
        1800,
        gt=0,
        description=(
            "Deadline for a whole URL download (every redirect and read together), in seconds; each single "
            "network wait is bounded by 30 s as well."
        ),
    )
    cleaning: CleaningConfig = Field(default_factory=CleaningConfig, description="Cleaning rule switches.")

    @field_validator("sha256")
    @classmethod
    def _hex(cls, v: str | None) -> str | None:
        if v is not None and (len(v) != 64 or any(c not in "0123456789abcdef" for c in v.lower())):
            raise ValueError("must be 64 hexadecimal characters")
        return v.lower() if v else v
