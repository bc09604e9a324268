"""Run-level pre-flight: everything a run needs from outside, checked in seconds before any work starts.

Hugging Face ids (data set and models) must be reachable or already cached, local files must exist, a
requested CUDA device must be present, and LoRA target modules named in the config must each match a
linear layer of every model (checked on the model's structure, built without weights). All problems are
reported together, in one line.
"""

from __future__ import annotations

from pathlib import Path

from pipeline_lib.config import ModelSpec, RunConfig


class RunPreflightError(RuntimeError):
    """One line listing everything the run cannot get."""


def _hub_reachable(kind: str, repo: str, revision: str | None, timeout: float) -> str | None:
    from huggingface_hub import HfApi

    from pipeline_lib.modeling.resolve import _cached_snapshot
    from pipeline_lib.netutil import call_with_deadline, one_line

    api = HfApi()
    fn = api.dataset_info if kind == "dataset" else api.model_info
    try:
        call_with_deadline(lambda: fn(repo, revision=revision, timeout=timeout), timeout + 1)
        return None
    except Exception as err:  # offline, unknown, gated, timeout
        if kind == "model" and _cached_snapshot(repo, revision, None) is not None:
            return None
        return f"cannot fetch {kind} {repo} from the Hugging Face Hub ({one_line(err, 120)})"


def _model_config(spec: ModelSpec, timeout: float):
    """`spec`'s model config (tiny: built here; a directory: its config.json; a Hub id: fetched), or None when
    it cannot be had (the problem, if any, is reported by the reachability check)."""
    from pipeline_lib.tiny import VOCAB_SIZE, is_tiny

    base = spec.base_model
    try:
        if is_tiny(base):
            from pipeline_lib.architectures import family

            return family(base.removeprefix("tiny:")).tiny_config(VOCAB_SIZE, None, None, None)
        from transformers import AutoConfig

        from pipeline_lib.netutil import call_with_deadline

        local = Path(base).expanduser()
        if local.is_dir():
            return AutoConfig.from_pretrained(local)
        return call_with_deadline(
            lambda: AutoConfig.from_pretrained(base, revision=spec.revision), timeout + 1
        )
    except Exception:  # noqa: BLE001 - no config, no check: loading the model names the problem
        return None


def check_lora_targets(config: RunConfig, timeout: float = 5.0) -> list[str]:
    """One problem per model that a named LoRA target matches no linear layer of ('all-linear' always fits)."""
    targets = config.lora.target_modules
    if targets == "all-linear":
        return []
    from pipeline_lib.modeling.introspection import _matches, linear_layer_names

    problems = []
    for i, spec in enumerate(config.models):
        model_config = _model_config(spec, timeout)
        if model_config is None:
            continue
        names = linear_layer_names(model_config)
        missing = [t for t in targets if not any(_matches(n, t) for n in names)]
        if missing:
            layers = sorted({n.rsplit(".", 1)[-1] for n in names})
            problems.append(
                f"lora.target_modules: {', '.join(map(repr, missing))} "
                f"match{'es' if len(missing) == 1 else ''} no linear layer of models.{i} "
                f"({spec.name}, {spec.base_model}); its linear layers: {', '.join(layers)}"
            )
    return problems


def check_run(config: RunConfig, timeout: float = 5.0) -> list[str]:
    """Problems that would stop `config` later; [] when none."""
    from pipeline_lib.data import redact_url, source_kind, unsupported_scheme
    from pipeline_lib.tiny import is_tiny

    problems: list[str] = []
    src = config.data.source
    kind = source_kind(src)
    if kind == "hf":
        p = _hub_reachable("dataset", src.removeprefix("hf://"), config.data.revision, timeout)
        if p:
            problems.append(p)
    elif kind == "unsupported":
        problems.append(f"data.source: {redact_url(src)}: {unsupported_scheme(src)}")
    elif kind == "file" and not Path(src).expanduser().is_file():
        problems.append(f"data.source: {src}: file not found")
    for i, m in enumerate(config.models):
        base = m.base_model
        if is_tiny(base) or Path(base).expanduser().is_dir():
            continue
        if base.startswith((".", "/", "~")):
            problems.append(f"models.{i}.base_model: {base}: not a model directory")
            continue
        p = _hub_reachable("model", base, m.revision, timeout)
        if p:
            problems.append(p)
    qs = config.inference.question_set
    if qs:
        from pipeline_lib.questions import load_questions

        try:
            load_questions(qs)
        except ValueError as err:
            problems.append(f"inference.question_set: {err}")
    problems += check_lora_targets(config, timeout)
    if config.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            problems.append("device: 'cuda' requested but no CUDA GPU is visible")
    return problems


def require(config: RunConfig, timeout: float = 5.0) -> None:
    problems = check_run(config, timeout)
    if problems:
        raise RunPreflightError("; ".join(problems))
