"""Base models: resolving, 4-bit loading, LoRA targets, pre-flight checks and merging.

Every check returns a JSON-able report (logged as MLflow params/metrics and a JSON artifact) and raises
`PreflightError` with a one-line message naming the model and the failed check when a run must not go on.

Traps handled here, per architecture (transformers 5.x, bitsandbytes, peft):

- Falcon: its linear layers are `FalconLinear(nn.Linear)`, and transformers' bitsandbytes integration only
  replaces modules whose type *is* `nn.Linear`, so a Falcon model asked for 4-bit silently loads with no
  4-bit layer at all. `load_model` constructs Falcon with `FalconLinear` resolved to `nn.Linear` (same maths:
  `x @ W.T + b`), and `check_quantized` stops any architecture where some linear layer stayed unquantized.
- OpenLLaMA: its model card advises against the auto-converted fast tokenizer. `recommended_use_fast` says so;
  transformers 5 has no slow Llama tokenizer and ignores `use_fast`, so `tokenizer_report` records whether the
  advice could be honoured.
- Any model: a model fresh from `from_pretrained` is in eval mode, where gradient checkpointing does nothing;
  `load_model(for_training=True)` calls `.train()`.
- bitsandbytes on CPUs with AVX512-BF16 (most cloud Xeons): the first forward of a `Linear4bit` in eval mode
  without gradients repacks its weight, for good, into an inference-only layout served by a kernel without
  an autograd formula; later *training* forwards then lose the gradient through the frozen weight, and output
  sizes that are not multiples of 32 crash. `load_model` switches that repacking off on every 4-bit layer
  (`keep_4bit_layers_trainable`), so training, evaluation during training and the merge-fidelity comparison
  all run the same dequantize-and-matmul path on every CPU.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import re
import shutil
import threading
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline_lib.config import LoraSettings, ModelSpec, QuantizationConfig, fingerprint
from pipeline_lib.netutil import call_with_deadline, one_line
from pipeline_lib.tiny import directory_fingerprint, is_tiny, materialize_tiny

if TYPE_CHECKING:
    import torch
    from transformers import BitsAndBytesConfig, PreTrainedModel


class PreflightError(RuntimeError):
    """A model, tokenizer or adapter failed a pre-flight check; the message is one line naming both."""


class ModelSourceError(PreflightError):
    """A base model could not be resolved (Hub unreachable, unknown repository, no weights)."""


# ----------------------------------------------------------------------------------------------------------
# Resolving the base model
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResolvedModel:
    """Where a base model's files are and which exact version they are."""

    name: str
    base_model: str
    path: str
    revision: str | None  # commit sha for Hub models; None for tiny and local directories
    fingerprint: str
    arch: str  # config.model_type
    source: str  # "tiny" | "local" | "hub" | "hub-cache"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_CONFIG_PATTERNS = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
]
_SAFETENSORS_PATTERNS = ["model*.safetensors", "model.safetensors.index.json"]
_BIN_PATTERNS = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
TOKENIZER_FILES = tuple(p for p in _CONFIG_PATTERNS if p not in ("config.json", "generation_config.json"))


def _weight_patterns(filenames: Sequence[str]) -> list[str]:
    """Safetensors weights when the repository has them, else PyTorch .bin weights."""
    from fnmatch import fnmatch

    if any(fnmatch(f, p) for f in filenames for p in _SAFETENSORS_PATTERNS):
        return _SAFETENSORS_PATTERNS
    if any(fnmatch(f, p) for f in filenames for p in _BIN_PATTERNS):
        return _BIN_PATTERNS
    return []


def _model_type(path: Path) -> str:
    cfg = path / "config.json"
    if not cfg.is_file():
        raise ModelSourceError(f"{path}: no config.json, not a model directory")
    return str(json.loads(cfg.read_text()).get("model_type", "unknown"))


def resolve_base_model(
    spec: ModelSpec, cache_dir: Path, timeout: float = 10, hub_cache_dir: Path | None = None
) -> ResolvedModel:
    """Find (and if needed download) `spec.base_model`; pin its exact version.

    - `tiny:ARCH`: built once per recipe in the shared tiny-model cache (`tiny.default_cache_dir()`).
    - an existing local directory: used in place, fingerprinted by content.
    - otherwise a Hugging Face id: the revision is resolved to a commit sha first (one request, bounded by
      `timeout`), then config, tokenizer and weights of that commit are downloaded (safetensors when the
      repository has them, else .bin) into `hub_cache_dir` (default: the Hugging Face cache). When the Hub
      cannot be reached, a snapshot already in that cache is used; otherwise `ModelSourceError` is raised.
    """
    base = spec.base_model
    if is_tiny(base):
        path, fp = materialize_tiny(base)
        return ResolvedModel(spec.name, base, str(path), None, fp, _model_type(path), "tiny")
    local = Path(base).expanduser()
    if local.is_dir():
        local = local.resolve()
        return ResolvedModel(
            spec.name, base, str(local), None, directory_fingerprint(local), _model_type(local), "local"
        )
    if local.exists() or base.startswith((".", "/", "~")):
        raise ModelSourceError(f"{spec.name}: {base} is not a model directory")
    return _resolve_hub(spec, timeout, hub_cache_dir)


def _resolve_hub(spec: ModelSpec, timeout: float, hub_cache_dir: Path | None) -> ResolvedModel:
    from huggingface_hub import HfApi, snapshot_download

    repo = spec.base_model
    cache = str(hub_cache_dir) if hub_cache_dir else None
    try:
        info = call_with_deadline(
            lambda: HfApi().model_info(repo, revision=spec.revision, timeout=timeout), timeout + 2
        )
    except Exception as err:  # any failure: offline, unknown repo, gated, timeout
        reason = one_line(err)
        cached = _cached_snapshot(repo, spec.revision, cache)
        if cached is None:
            raise ModelSourceError(f"cannot fetch {repo} from the Hugging Face Hub: {reason}") from None
        return ResolvedModel(
            spec.name,
            repo,
            str(cached),
            cached.name,
            fingerprint({"repo": repo, "sha": cached.name, "files": _listing(cached)}),
            _model_type(cached),
            "hub-cache",
        )
    sha = info.sha
    filenames = [s.rfilename for s in (info.siblings or [])]
    weights = _weight_patterns(filenames)
    if not weights:
        raise ModelSourceError(f"{repo}@{sha}: the repository has no safetensors or .bin weights")
    try:
        path = Path(
            snapshot_download(
                repo,
                revision=sha,
                cache_dir=cache,
                allow_patterns=_CONFIG_PATTERNS + weights,
                etag_timeout=timeout,
            )
        )
    except Exception as err:
        raise ModelSourceError(f"cannot download {repo}@{sha}: {one_line(err)}") from None
    return ResolvedModel(
        spec.name,
        repo,
        str(path),
        sha,
        fingerprint({"repo": repo, "sha": sha, "files": _listing(path)}),
        _model_type(path),
        "hub",
    )


def _cached_snapshot(repo: str, revision: str | None, cache: str | None) -> Path | None:
    from huggingface_hub import snapshot_download

    try:
        path = Path(
            snapshot_download(
                repo,
                revision=revision,
                cache_dir=cache,
                local_files_only=True,
                allow_patterns=_CONFIG_PATTERNS + _SAFETENSORS_PATTERNS + _BIN_PATTERNS,
            )
        )
    except Exception:  # not cached
        return None
    if not (path / "config.json").is_file() or not _weight_patterns(_listing(path)):
        return None
    return path


def _listing(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------

_DTYPES = ("bfloat16", "float16", "float32")


def torch_dtype(name: str) -> torch.dtype:
    """torch dtype of a `QuantizationConfig.compute_dtype` name."""
    import torch

    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of: {', '.join(_DTYPES)}")
    return getattr(torch, name)


def bnb_config(q: QuantizationConfig) -> BitsAndBytesConfig | None:
    """The bitsandbytes 4-bit config for `q`, or None when 4-bit loading is off."""
    if not q.load_in_4bit:
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=torch_dtype(q.compute_dtype),
    )


_PATCH_LOCK = threading.Lock()


@contextlib.contextmanager
def falcon_linear_as_nn_linear() -> Iterator[None]:
    """While active, Falcon models are built with `torch.nn.Linear` where they would use `FalconLinear`.

    `FalconLinear.forward` is `x @ W.T + b`, the same function as `nn.Linear`, and the parameter names are
    the same, so checkpoints load unchanged. It matters for 4-bit loading: transformers replaces a module
    with a bitsandbytes `Linear4bit` only when its type is exactly `nn.Linear`.
    """
    import torch
    from transformers.models.falcon import modeling_falcon

    with _PATCH_LOCK:
        original = modeling_falcon.FalconLinear
        modeling_falcon.FalconLinear = torch.nn.Linear
        try:
            yield
        finally:
            modeling_falcon.FalconLinear = original


def keep_4bit_layers_trainable(model) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference (see the module docstring); undo a
    repacking that already happened. Returns the number of 4-bit layers seen.

    `Linear4bit.forward` repacks only when its `support_avx512bf16_for_cpu` attribute is true (set at
    construction from the CPU's flags), so the attribute is cleared on every 4-bit layer; the packed layout is
    detected from `quant_state.packing_format_for_cpu` and converted back with bitsandbytes' own inverse.
    Weights stay bit-for-bit the same, only the kernel that multiplies them changes."""
    try:
        import bitsandbytes as bnb
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
    except ImportError:  # no bitsandbytes: no 4-bit layers
        return 0
    n = 0
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        n += 1
        module.support_avx512bf16_for_cpu = False
        weight = module.weight
        state = getattr(weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
    return n


def device_map_for(device: str) -> dict[str, Any]:
    if device == "cuda":
        import torch

        return {"": torch.cuda.current_device()}
    return {"": device}


def load_model(
    path: str | Path,
    q: QuantizationConfig,
    device: str = "cpu",
    for_training: bool = False,
    gradient_checkpointing: bool = False,
    attn_implementation: str | None = None,
    upcast_fp32: bool = True,
) -> PreTrainedModel:
    """Load a causal LM: linear layers in 4-bit when `q.load_in_4bit`, everything else in `q.compute_dtype`.

    With `for_training` the base is frozen, non-reentrant gradient checkpointing is enabled when asked, and
    the model is put in train mode (without it, it is in eval mode, where checkpointing does nothing). A 4-bit
    model goes through peft's `prepare_model_for_kbit_training`, which also upcasts every non-quantized
    parameter (norms, embeddings, head) to float32 for stable training; `upcast_fp32=False` skips that upcast
    (it doubles the memory of the embeddings, 1.3 GB more for a 250k-token vocabulary like Bloom's).
    """
    from transformers import AutoModelForCausalLM

    quant = bnb_config(q)
    kwargs: dict[str, Any] = dict(dtype=torch_dtype(q.compute_dtype), device_map=device_map_for(device))
    if quant is not None:
        kwargs["quantization_config"] = quant
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    patch = falcon_linear_as_nn_linear() if quant is not None else contextlib.nullcontext()
    with patch:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    keep_4bit_layers_trainable(model)
    if not for_training:
        model.eval()
        return model
    gc_kwargs = {"use_reentrant": False}
    if quant is not None and upcast_fp32:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs=gc_kwargs,
        )
    else:
        model.requires_grad_(False)
        if gradient_checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", None)
            if enable is not None:  # transformers >= 5.23 name
                enable(activation_checkpointing_kwargs=gc_kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
    if gradient_checkpointing:
        model.config.use_cache = False
    model.train()
    return model


def is_checkpointing(model) -> bool:
    """Whether gradient (activation) checkpointing is on in any submodule."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


# ----------------------------------------------------------------------------------------------------------
# Linear layers and LoRA targets
# ----------------------------------------------------------------------------------------------------------


def _linear_types() -> tuple[type, ...]:
    import torch
    from transformers.pytorch_utils import Conv1D

    types: list[type] = [torch.nn.Linear, Conv1D]
    with contextlib.suppress(ImportError):
        import bitsandbytes as bnb

        types += [bnb.nn.Linear4bit, bnb.nn.Linear8bitLt]
    return tuple(types)


def _output_head(model) -> Any:
    get = getattr(model, "get_output_embeddings", None)
    with contextlib.suppress(Exception):
        return get() if get else None
    return None


def _base_linear_modules(model) -> Iterator[tuple[str, Any]]:
    """(name, module) of every linear layer of the base model except the output head.

    On a peft model the wrapped `base_layer` is reported under its wrapper's name and the LoRA matrices
    themselves are skipped.
    """
    types = _linear_types()
    head = _output_head(model)
    for name, module in model.named_modules():
        parts = name.split(".")
        if any(p.startswith("lora_") for p in parts):
            continue
        if module is head or parts[-1] == "lm_head":
            continue
        if isinstance(module, types):
            if parts[-1] == "base_layer":
                name = ".".join(parts[:-1])
            yield name, module


def _model_label(model, model_name: str | None) -> str:
    if model_name:
        return model_name
    cfg = getattr(model, "config", None)
    return str(getattr(cfg, "_name_or_path", None) or getattr(cfg, "model_type", None) or "model")


def lora_target_modules(model) -> list[str]:
    """Short names (q_proj, query_key_value, ...) of every linear layer of the loaded model but the head."""
    return sorted({name.rsplit(".", 1)[-1] for name, _ in _base_linear_modules(model)})


def _matches(module_name: str, target: str) -> bool:
    return module_name == target or module_name.endswith("." + target)


def check_lora_targets(model, targets: Sequence[str], model_name: str | None = None) -> dict[str, int]:
    """How many linear layers each target names; PreflightError if one names none."""
    names = [n for n, _ in _base_linear_modules(model)]
    counts = {t: sum(_matches(n, t) for n in names) for t in targets}
    for t, c in counts.items():
        if c == 0:
            raise PreflightError(f"LoRA target {t!r} matches no module of {_model_label(model, model_name)}")
    return counts


def lora_config(settings: LoraSettings, targets: Sequence[str], model=None, model_name: str | None = None):
    """peft LoraConfig (causal LM, no bias training) on `targets`; checked against `model` when given."""
    from peft import LoraConfig

    targets = list(targets)
    if not targets:
        raise PreflightError(f"{_model_label(model, model_name)}: no LoRA target modules")
    if model is not None:
        check_lora_targets(model, targets, model_name)
    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )


def resolve_lora_targets(model, settings: LoraSettings, model_name: str | None = None) -> list[str]:
    """`settings.target_modules` for `model`: 'all-linear' resolved, or the explicit list checked."""
    if settings.target_modules == "all-linear":
        return lora_target_modules(model)
    targets = list(settings.target_modules)
    check_lora_targets(model, targets, model_name)
    return targets


# ----------------------------------------------------------------------------------------------------------
# Pre-flight: quantization
# ----------------------------------------------------------------------------------------------------------


def _unquantized_numel(param) -> int:
    """Element count of a parameter before quantization (a 4-bit parameter packs two values per byte)."""
    qs = getattr(param, "quant_state", None)
    if qs is not None and getattr(qs, "shape", None) is not None:
        return int(math.prod(qs.shape))
    return int(param.numel())


def quantization_report(model) -> dict[str, Any]:
    """Which linear layers are 4-bit, and the memory it saves.

    linear_layers / linear_4bit / share_4bit: linear layers other than the output head, and how many are
    bitsandbytes `Linear4bit`; not_4bit: up to 20 names of the others; footprint_bytes:
    `model.get_memory_footprint()`; bf16_footprint_bytes: 2 bytes per unquantized parameter; ratio:
    footprint / bf16 estimate; params: the unquantized parameter count.
    """
    try:
        import bitsandbytes as bnb

        four_bit: tuple[type, ...] = (bnb.nn.Linear4bit,)
    except ImportError:
        four_bit = ()
    linear = list(_base_linear_modules(model))
    quantized = [n for n, m in linear if four_bit and isinstance(m, four_bit)]
    not_4bit = [n for n, m in linear if not (four_bit and isinstance(m, four_bit))]
    params = sum(_unquantized_numel(p) for p in model.parameters())
    footprint = int(model.get_memory_footprint())
    bf16 = 2 * params
    kinds = sorted({type(m).__name__ for _, m in linear})
    quant_types = sorted(
        {str(getattr(m.weight, "quant_type", "")) for _, m in linear if four_bit and isinstance(m, four_bit)}
    )
    return {
        "arch": str(getattr(getattr(model, "config", None), "model_type", "unknown")),
        "linear_layers": len(linear),
        "linear_4bit": len(quantized),
        "share_4bit": len(quantized) / len(linear) if linear else 0.0,
        "not_4bit": not_4bit[:20],
        "linear_kinds": kinds,
        "quant_types": [t for t in quant_types if t],
        "params": params,
        "footprint_bytes": footprint,
        "bf16_footprint_bytes": bf16,
        "ratio": footprint / bf16 if bf16 else math.nan,
    }


def check_quantized(report: dict[str, Any], model_name: str, expected: bool = True) -> None:
    """Every linear layer but the head must be 4-bit when 4-bit was requested (and none when it was not)."""
    n, n4 = report["linear_layers"], report["linear_4bit"]
    if expected:
        if n == 0:
            raise PreflightError(f"{model_name}: quantization check failed: no linear layers found")
        if report["share_4bit"] < 1.0:
            shown = ", ".join(report["not_4bit"][:3])
            kinds = ", ".join(report.get("linear_kinds", []))
            raise PreflightError(
                f"{model_name}: quantization check failed: only {n4}/{n} linear layers are 4-bit "
                f"(not 4-bit: {shown}{', ...' if n - n4 > 3 else ''}; layer types: {kinds})"
            )
    elif n4:
        raise PreflightError(
            f"{model_name}: quantization check failed: {n4}/{n} linear layers are 4-bit but 4-bit was not requested"
        )


# ----------------------------------------------------------------------------------------------------------
# Pre-flight: tokenizer
# ----------------------------------------------------------------------------------------------------------


def recommended_use_fast(base_model: str) -> bool | None:
    """The model's own advice on the fast tokenizer: False for OpenLLaMA (its card warns that the
    auto-converted fast tokenizer gave wrong tokenizations), None where there is no advice."""
    return False if "open_llama" in base_model.lower() else None


def _ids(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


_PROBE = "### Instruction:\nName a colour.\n\n### Response:\nBlue."


def tokenizer_report(
    tokenizer, base_model: str, model_config, embedding_rows: int | None = None
) -> dict[str, Any]:
    """How the tokenizer's special tokens and vocabulary fit the model.

    Raises PreflightError when the tokenizer has no EOS token, or when a token id could index past the
    embedding matrix. Everything else is reported, with advice in `warnings`:
    eos (id, token, matches config, appended by the tokenizer), pad (present, equals EOS), bos (id, matches
    config, prepended by the tokenizer), fast/slow (is_fast, the model's advice, honoured), vocabulary size
    vs embedding rows, and whether the Alpaca prompt survives an encode/decode round trip.
    """
    warnings: list[str] = []
    eos_id = tokenizer.eos_token_id
    if eos_id is None or tokenizer.eos_token is None:
        raise PreflightError(f"{base_model}: tokenizer check failed: the tokenizer has no EOS token")
    cfg_eos = _ids(getattr(model_config, "eos_token_id", None))
    eos_matches = eos_id in cfg_eos
    if not eos_matches:
        warnings.append(
            f"tokenizer EOS {eos_id} is not the model config's eos_token_id {cfg_eos or None}: train on the "
            "tokenizer's EOS and pass eos_token_id=tokenizer.eos_token_id to generate()"
        )
    pad_id = tokenizer.pad_token_id
    pad_is_eos = pad_id is not None and pad_id == eos_id
    if pad_id is None:
        warnings.append("no pad token: batches need one (e.g. EOS); mask labels by position, not by pad id")
    elif pad_is_eos:
        warnings.append("pad token is EOS: build labels by position/attention mask so the EOS target is kept")

    plain = tokenizer("Hello", add_special_tokens=True)["input_ids"]
    bare = tokenizer("Hello", add_special_tokens=False)["input_ids"]
    bos_id = tokenizer.bos_token_id
    prepends_bos = bool(plain) and bos_id is not None and plain[0] == bos_id and len(plain) > len(bare)
    appends_eos = bool(plain) and plain[-1] == eos_id and len(plain) > len(bare)
    if appends_eos:
        warnings.append(
            "the tokenizer appends EOS when encoding: prompts are encoded without it, in training and "
            "inference alike (tokenization.encode_prompts)"
        )
    cfg_bos = _ids(getattr(model_config, "bos_token_id", None))
    bos_matches = None if bos_id is None else (bos_id in cfg_bos if cfg_bos else None)
    if prepends_bos and bos_matches is False:
        warnings.append(f"the tokenizer prepends BOS {bos_id} but the model config says {cfg_bos}")

    recommended = recommended_use_fast(base_model)
    is_fast = bool(getattr(tokenizer, "is_fast", False))
    honoured = recommended is None or recommended == is_fast
    if not honoured:
        warnings.append(
            f"the model advises use_fast={recommended} but the loaded tokenizer is "
            f"{'fast' if is_fast else 'slow'} (transformers 5 ignores use_fast); compare token ids against "
            "the reference tokenizer before trusting results"
        )

    vocab = len(tokenizer)
    max_id = max([vocab - 1, *[int(i) for i in getattr(tokenizer, "added_tokens_decoder", {}) or {}]])
    rows = embedding_rows if embedding_rows is not None else getattr(model_config, "vocab_size", None)
    if rows is not None and max_id >= int(rows):
        raise PreflightError(
            f"{base_model}: tokenizer check failed: token id {max_id} exceeds the {rows}-row embedding matrix"
        )
    ids = tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
    roundtrip = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    roundtrip_ok = roundtrip == _PROBE
    if not roundtrip_ok:
        warnings.append("the prompt template does not survive an encode/decode round trip")
    return {
        "tokenizer_class": type(tokenizer).__name__,
        "is_fast": is_fast,
        "use_fast_recommended": recommended,
        "use_fast_honoured": honoured,
        "eos_token": str(tokenizer.eos_token),
        "eos_token_id": int(eos_id),
        "config_eos_token_id": cfg_eos,
        "eos_matches_config": eos_matches,
        "appends_eos": appends_eos,
        "pad_token_id": pad_id,
        "has_pad": pad_id is not None,
        "pad_is_eos": pad_is_eos,
        "bos_token_id": bos_id,
        "config_bos_token_id": cfg_bos,
        "prepends_bos": prepends_bos,
        "bos_matches_config": bos_matches,
        "vocab_size": vocab,
        "max_token_id": max_id,
        "embedding_rows": int(rows) if rows is not None else None,
        "roundtrip_ok": roundtrip_ok,
        "warnings": warnings,
    }


# ----------------------------------------------------------------------------------------------------------
# Pre-flight: LoRA and the saved adapter
# ----------------------------------------------------------------------------------------------------------


def lora_report(peft_model, model_name: str | None = None, adapter_name: str = "default") -> dict[str, Any]:
    """LoRA targets, layers wrapped per target, trainable parameters and their share.

    Raises PreflightError when nothing is trainable or a target wrapped no layer.
    """
    from peft.tuners.lora import LoraLayer

    label = _model_label(peft_model, model_name)
    cfg = peft_model.peft_config[adapter_name]
    lora_layers = [n for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)]
    raw = cfg.target_modules
    if isinstance(raw, str):
        targets = [raw]
        counts = {raw: sum(bool(re.fullmatch(raw, n)) for n in lora_layers)}
    else:
        targets = sorted(raw or [])
        counts = {t: sum(_matches(n, t) for n in lora_layers) for t in targets}
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(_unquantized_numel(p) for p in peft_model.parameters())
    trainable_other = [n for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" not in n]
    report = {
        "targets": targets,
        "layers_per_target": counts,
        "lora_layers": len(lora_layers),
        "r": cfg.r,
        "alpha": cfg.lora_alpha,
        "dropout": cfg.lora_dropout,
        "trainable_params": int(trainable),
        "total_params": int(total),
        "trainable_share": trainable / total if total else 0.0,
        "trainable_non_lora": trainable_other[:20],
    }
    if trainable == 0:
        raise PreflightError(f"{label}: LoRA check failed: no trainable parameters")
    for t, c in counts.items():
        if c == 0:
            raise PreflightError(f"LoRA target {t!r} matches no module of {label}")
    return report


def snapshot_lora(peft_model) -> dict[str, torch.Tensor]:
    """CPU copies of the adapter weights, keyed as `save_pretrained` writes them."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().to("cpu").clone() for k, v in get_peft_model_state_dict(peft_model).items()}


_ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def _load_adapter_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    import torch

    return torch.load(str(path), map_location="cpu", weights_only=True)


def check_adapter(
    adapter_dir: str | Path, initial: dict[str, torch.Tensor] | None = None, model_name: str | None = None
) -> dict[str, Any]:
    """After `save_pretrained`: the adapter file exists, holds finite lora_A/lora_B tensors for every target,
    and training moved it away from its initialisation (lora_B starts at zero, so some lora_B must be
    non-zero; with `initial` from `snapshot_lora`, at least one tensor must differ from it).
    """
    import torch

    adapter_dir = Path(adapter_dir)
    cfg_path = adapter_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    label = model_name or cfg.get("base_model_name_or_path") or str(adapter_dir)
    file = next((adapter_dir / f for f in _ADAPTER_FILES if (adapter_dir / f).is_file()), None)
    if file is None:
        raise PreflightError(f"{label}: adapter check failed: no adapter file in {adapter_dir}")
    size = file.stat().st_size
    try:
        tensors = _load_adapter_tensors(file) if size else {}
    except Exception as err:  # a truncated or corrupt file
        raise PreflightError(
            f"{label}: adapter check failed: cannot read {file.name}: {one_line(err)}"
        ) from None
    a_keys = sorted(k for k in tensors if "lora_A" in k)
    b_keys = sorted(k for k in tensors if "lora_B" in k)
    if not a_keys or not b_keys or any(t.numel() == 0 for t in tensors.values()):
        raise PreflightError(
            f"{label}: adapter saved empty ({file.name}: {len(tensors)} tensors, {size} bytes)"
        )
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise PreflightError(f"{label}: adapter check failed: non-finite values in {bad[0]}")
    raw = cfg.get("target_modules")
    targets = [raw] if isinstance(raw, str) else sorted(raw or [])
    missing = []
    if not isinstance(raw, str):  # a list of names (a string is a regular expression)
        missing = [
            t for t in targets if not any(re.search(rf"(^|\.){re.escape(t)}\.lora_A", k) for k in a_keys)
        ]
    if missing:
        raise PreflightError(f"{label}: adapter check failed: no LoRA weights for target {missing[0]!r}")
    b_max = max(float(tensors[k].abs().max()) for k in b_keys)
    changed: list[str] = []
    if initial:
        absent = [k for k in initial if k not in tensors]
        if absent:
            raise PreflightError(f"{label}: adapter check failed: saved adapter lacks {absent[0]}")
        changed = [k for k, t in initial.items() if not torch.equal(tensors[k].to(t.dtype).cpu(), t)]
    if b_max == 0.0 or (initial and not changed):
        raise PreflightError(f"{label}: adapter unchanged from initialisation ({file.name})")
    return {
        "file": file.name,
        "bytes": size,
        "tensors": len(tensors),
        "lora_A": len(a_keys),
        "lora_B": len(b_keys),
        "targets": targets,
        "lora_B_max_abs": b_max,
        "changed_tensors": len(changed) if initial else None,
        "compared_tensors": len(initial) if initial else 0,
    }


# ----------------------------------------------------------------------------------------------------------
# Merging
# ----------------------------------------------------------------------------------------------------------


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the tokenizer's files byte for byte (re-saving could re-convert them)."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def merge_adapter(
    base_path: str | Path,
    adapter_dir: str | Path,
    out_dir: str | Path,
    dtype: torch.dtype | str = "bfloat16",
    device: str = "cpu",
) -> dict[str, Any]:
    """Merge a LoRA adapter into the base loaded in `dtype` (not 4-bit) and save model + tokenizer.

    The base is loaded unquantized on purpose: merging into dequantized 4-bit weights would bake the 4-bit
    rounding error into every merged layer. QLoRA trained the adapter against the 4-bit weights, though, so the
    merged model is not exactly the trained one: `merge_fidelity` measures the difference.
    Falcon needs no `FalconLinear` care here: peft wraps and merges any `nn.Linear` subclass of an unquantized
    model, and the saved parameter names are the base's.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dt = torch_dtype(dtype) if isinstance(dtype, str) else dtype
    out_dir = Path(out_dir)
    base = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=dt, device_map=device_map_for(device))
    base_keys = set(base.state_dict())
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    from peft.tuners.lora import LoraLayer

    merged_layers = sum(isinstance(m, LoraLayer) for m in model.modules())
    merged = model.merge_and_unload(safe_merge=True)
    keys = set(merged.state_dict())
    leftover = sorted(k for k in keys if "lora_" in k or "base_layer" in k)
    if leftover or keys != base_keys:
        odd = leftover[:1] or sorted(keys ^ base_keys)[:1]
        raise PreflightError(f"{base_path}: merge check failed: unexpected parameter {odd[0]}")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    merged.save_pretrained(str(out_dir))
    files = copy_tokenizer_files(base_path, out_dir)
    del merged, model, base
    gc.collect()
    return {
        "merged_dir": str(out_dir),
        "dtype": str(dt).removeprefix("torch."),
        "merged_layers": merged_layers,
        "tokenizer_files": files,
        "bytes": sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file()),
        "fingerprint": directory_fingerprint(out_dir),
    }


def _token_logprobs(model, tokenizer, texts: Sequence[str], max_length: int, device: str):
    import torch

    out = []
    dev = torch.device(device if device != "cuda" else f"cuda:{torch.cuda.current_device()}")
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)["input_ids"]
            if ids.shape[1] < 2:
                continue
            ids = ids.to(dev)
            logits = model(input_ids=ids).logits[0, :-1].float()
            logp = torch.log_softmax(logits, dim=-1).cpu()
            out.append((logp, ids[0, 1:].cpu()))
    return out


def merge_fidelity(
    base_path: str | Path,
    adapter_dir: str | Path,
    merged_dir: str | Path,
    q: QuantizationConfig,
    tokenizer,
    texts: Sequence[str],
    device: str = "cpu",
    max_length: int = 256,
) -> dict[str, Any]:
    """Compare the model as trained (base loaded per `q` — 4-bit for QLoRA — plus the unmerged adapter) with
    the merged model (loaded in its saved dtype) on `texts`.

    Reports the largest and mean absolute difference of next-token log-probabilities over every position
    and vocabulary entry, each model's mean token loss and their delta (merged - reference), and the share
    of positions where both predict the same next token.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    reference = PeftModel.from_pretrained(load_model(base_path, q, device), str(adapter_dir)).eval()
    ref = _token_logprobs(reference, tokenizer, texts, max_length, device)
    del reference
    gc.collect()
    merged = AutoModelForCausalLM.from_pretrained(
        str(merged_dir), dtype="auto", device_map=device_map_for(device)
    ).eval()
    mer = _token_logprobs(merged, tokenizer, texts, max_length, device)
    del merged
    gc.collect()
    if not ref:
        raise PreflightError(f"{merged_dir}: merge fidelity needs texts of at least two tokens")
    max_diff, sum_diff, n_cells = 0.0, 0.0, 0
    nll_ref, nll_mer, same, n_tok = 0.0, 0.0, 0, 0
    for (lr, tgt), (lm, _) in zip(ref, mer, strict=True):
        d = (lr - lm).abs()
        max_diff = max(max_diff, float(d.max()))
        sum_diff += float(d.sum())
        n_cells += d.numel()
        nll_ref -= float(lr.gather(1, tgt[:, None]).sum())
        nll_mer -= float(lm.gather(1, tgt[:, None]).sum())
        same += int((lr.argmax(-1) == lm.argmax(-1)).sum())
        n_tok += int(tgt.numel())
    loss_ref, loss_mer = nll_ref / n_tok, nll_mer / n_tok
    return {
        "reference": f"{'4-bit' if q.load_in_4bit else q.compute_dtype} base + adapter",
        "texts": len(ref),
        "tokens": n_tok,
        "max_abs_logprob_diff": max_diff,
        "mean_abs_logprob_diff": sum_diff / n_cells,
        "loss_reference": loss_ref,
        "loss_merged": loss_mer,
        "loss_delta": loss_mer - loss_ref,
        "top1_agreement": same / n_tok,
    }
