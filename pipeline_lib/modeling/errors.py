"""The errors of the model stage: one line naming the model and the failed check."""

from __future__ import annotations


class PreflightError(RuntimeError):
    """A model, tokenizer or adapter failed a pre-flight check; the message is one line naming both."""


class ModelSourceError(PreflightError):
    """A base model could not be resolved (Hub unreachable, unknown repository, no weights)."""
