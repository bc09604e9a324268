"""Base models: resolving, 4-bit loading, introspection, LoRA, pre-flight checks and merging.

- `resolve`: where a base model's files are and which exact version they are (`ResolvedModel`);
- `loading`: the model for QLoRA training or for inference, 4-bit on every family and every CPU;
- `introspection`: linear layers (LoRA targets) and which of them are 4-bit (`quantization_report`);
- `lora`: the LoRA config, its report, and the check of a saved adapter;
- `tokenizer_checks`: a tokenizer against its model (EOS, pad, BOS, vocabulary, the card's advice);
- `merging`: the adapter merged into its base, and the merged model compared with the trained one.

Every check returns a JSON-able report (logged as MLflow params/metrics and a JSON artifact) and raises
`PreflightError` with a one-line message naming the model and the failed check when a run must not go on.
Per-family knowledge (the Falcon loading patch, tokenizer advice) lives in `pipeline_lib.architectures`.
"""

from pipeline_lib.modeling.errors import ModelSourceError, PreflightError
from pipeline_lib.modeling.introspection import check_quantized, lora_target_modules, quantization_report
from pipeline_lib.modeling.loading import (
    bnb_config,
    is_checkpointing,
    keep_4bit_layers_trainable,
    load_model,
    torch_dtype,
)
from pipeline_lib.modeling.lora import (
    check_adapter,
    check_lora_targets,
    lora_config,
    lora_report,
    resolve_lora_targets,
    snapshot_lora,
)
from pipeline_lib.modeling.merging import (
    compare_logprobs,
    copy_tokenizer_files,
    merge_adapter,
    merge_fidelity,
    merge_report,
    token_logprobs,
)
from pipeline_lib.modeling.resolve import TOKENIZER_FILES, ResolvedModel, resolve_base_model
from pipeline_lib.modeling.tokenizer_checks import recommended_use_fast, tokenizer_report

__all__ = [
    "TOKENIZER_FILES",
    "ModelSourceError",
    "PreflightError",
    "ResolvedModel",
    "bnb_config",
    "check_adapter",
    "check_lora_targets",
    "check_quantized",
    "copy_tokenizer_files",
    "is_checkpointing",
    "keep_4bit_layers_trainable",
    "load_model",
    "lora_config",
    "lora_report",
    "lora_target_modules",
    "merge_adapter",
    "compare_logprobs",
    "merge_fidelity",
    "merge_report",
    "quantization_report",
    "recommended_use_fast",
    "resolve_base_model",
    "resolve_lora_targets",
    "snapshot_lora",
    "token_logprobs",
    "tokenizer_report",
    "torch_dtype",
]
