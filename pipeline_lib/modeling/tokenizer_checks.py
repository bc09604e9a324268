"""Pre-flight of a tokenizer against its model: EOS, pad, BOS, vocabulary, the model card's advice."""

from __future__ import annotations

from typing import Any

from pipeline_lib import architectures
from pipeline_lib.modeling.errors import PreflightError


def recommended_use_fast(base_model: str) -> bool | None:
    """The model card's advice on the fast tokenizer (`Family.use_fast_advice`): False for OpenLLaMA (its card
    warns that the auto-converted fast tokenizer gave wrong tokenizations), None where there is no advice."""
    for fam in architectures.FAMILIES.values():
        advice = fam.use_fast_advice(base_model)
        if advice is not None:
            return advice
    return None


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
