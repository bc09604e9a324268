"""qabot's library: pure, typed functions for data, prompts, tokenization, modeling, training, merge,
inference, comparison and tracking. It never imports Prefect; `tasks/` and `flows/` wire it."""

__version__ = "0.1.0"
