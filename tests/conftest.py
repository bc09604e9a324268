"""Shared fixtures: tiny models of each real architecture, built once per test session, offline."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DISABLE_MLFLOW_INTEGRATION", "FALSE")

ARCHS = ("llama", "bloom", "falcon")


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, str]:
    """{arch: path} of tiny Llama, Bloom and Falcon models with their tokenizers, from the shared tiny-model
    cache (built once per recipe, reused by later sessions and by `make demo`)."""
    from pipeline_lib.tiny import materialize_tiny

    return {arch: str(materialize_tiny(f"tiny:{arch}")[0]) for arch in ARCHS}


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
