"""The checks behind `RunConfig` fields whose values come from a list: presets, optimizers, LoRA target
names, tiny architectures. Each raises `ValueError` with one line: what is unknown, the closest choice, and
every choice."""

from __future__ import annotations

import difflib
import re

from pydantic import BaseModel, ConfigDict

PROFILES = ("smoke", "report")
CUSTOM = "custom"  # the `profile` of a config that starts from no preset

# The transformers optimizers (`TrainingArguments.optim`) that need nothing beyond torch and bitsandbytes;
# the others need packages qabot does not install (torchao, galore, lomo, schedulefree, apollo, ...).
OPTIMIZERS = (
    "adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adagrad", "rmsprop",
    "adamw_bnb_8bit", "adamw_8bit", "lion_8bit", "lion_32bit", "ademamix", "ademamix_8bit",
    "rmsprop_bnb", "rmsprop_bnb_8bit", "rmsprop_bnb_32bit",
    "paged_adamw_32bit", "paged_adamw_8bit", "paged_lion_32bit", "paged_lion_8bit",
    "paged_ademamix_32bit", "paged_ademamix_8bit",
)  # fmt: skip

_MODULE_NAME = re.compile(r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*")


def choose(what: str, value: object, choices: tuple[str, ...] | list[str]) -> str:
    """`unknown WHAT 'x' (did you mean 'y'?); choose one of: a, b, c` (the hint only when one is close)."""
    close = difflib.get_close_matches(str(value), list(choices), n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown {what} {value!r}{hint}; choose one of: {', '.join(choices)}"


def known_profile(value: str) -> str:
    if value != CUSTOM and value not in PROFILES:
        raise ValueError(choose("profile", value, PROFILES) + f" (or {CUSTOM} for a config of your own)")
    return value


def known_optimizer(value: str) -> str:
    if value not in OPTIMIZERS:
        raise ValueError(choose("optimizer", value, OPTIMIZERS))
    return value


def known_tiny(value: str) -> str:
    """A `tiny:ARCH` base model must name an architecture qabot can build; other names pass."""
    from pipeline_lib.architectures import ARCHS

    if value.startswith("tiny:") and value.removeprefix("tiny:") not in ARCHS:
        raise ValueError(choose("tiny architecture", value, [f"tiny:{a}" for a in ARCHS]))
    return value


def module_names(value: object) -> object:
    """'all-linear', or a non-empty list of module names (whether each matches a layer is pre-flight's)."""
    if not isinstance(value, list) and value != "all-linear":
        one = f"; for one module write [{value}]" if isinstance(value, str) else ""
        raise ValueError(f"{value!r} is neither all-linear nor a list of module names{one}")
    if isinstance(value, list):
        if not value:
            raise ValueError(
                "an empty list adapts no layer; name layers (e.g. [q_proj, v_proj]) or use all-linear"
            )
        bad = [n for n in value if not (isinstance(n, str) and _MODULE_NAME.fullmatch(n))]
        if bad:
            raise ValueError(f"{bad[0]!r} is not a module name (letters, digits, '_', dots between parts)")
    return value


class ConfigError(ValueError):
    """A configuration that cannot be used; the message is one line naming the field and the problem."""


class _Strict(BaseModel):
    # NaN and infinity are refused in every field: no setting means anything with them.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
