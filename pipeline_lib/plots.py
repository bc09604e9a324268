"""The comparison's plots (PNG): training curves, held-out metrics before and after, utilisation and memory
over time, time and throughput. Each takes the comparison's tables and writes one file."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def plot_curves(curve_df: pd.DataFrame, out_path: str | Path) -> Path:
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    for model, g in curve_df.groupby("model"):
        gl = g.dropna(subset=["loss"])
        # x = share of the model's own training, so runs of different lengths overlay
        ax1.plot(gl["step"] / max(gl["step"].max(), 1), gl["loss"], label=model)
        glr = g.dropna(subset=["learning_rate"])
        ax2.plot(glr["step"] / max(glr["step"].max(), 1), glr["learning_rate"], label=model)
    ax1.set(
        title="Training loss (per token of each model's tokenizer)", xlabel="share of training", ylabel="loss"
    )
    ax2.set(title="Learning rate", xlabel="share of training", ylabel="lr")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, Path(out_path))


def plot_heldout(board: pd.DataFrame, out_path: str | Path) -> Path:
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    x = range(len(board))
    w = 0.38
    for ax, key, title in (
        (ax1, "bits_per_byte", "Held-out bits per byte (lower is better)"),
        (ax2, "question_score", "Question score (higher is better)"),
    ):
        before = board[f"{key}_before"].fillna(0).tolist()
        after = board[key].fillna(0).tolist()
        ax.bar([i - w / 2 for i in x], before, w, label="before fine-tuning", color="#bbbbbb")
        ax.bar([i + w / 2 for i in x], after, w, label="after", color="#3b7dd8")
        for i, (b, a) in enumerate(zip(before, after, strict=True)):
            ax.annotate(f"{a:.2f}", (i + w / 2, a), ha="center", va="bottom", fontsize=8)
            ax.annotate(f"{b:.2f}", (i - w / 2, b), ha="center", va="bottom", fontsize=8, color="#555555")
        ax.set_xticks(list(x), board["model"].tolist())
        ax.set(title=title)
        ax.grid(alpha=0.3, axis="y")
        ax.legend()
    return _save(fig, Path(out_path))


def plot_system(system: dict[str, dict[str, list]], out_path: str | Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    panels = (("cpu_util", "gpu_util", "Utilisation (%)"), ("ram_mb", "gpu_mem_mb", "Memory (MB)"))
    drawn = False
    for ax, (cpu_key, gpu_key, title) in zip(axes, panels, strict=True):
        for model, series in system.items():
            for key, style in ((cpu_key, "-"), (gpu_key, "--")):
                pts = series.get(key) or []
                if pts:
                    t0 = pts[0][0]
                    ax.plot(
                        [(t - t0) / 1000 for t, _ in pts], [v for _, v in pts], style, label=f"{model} {key}"
                    )
                    drawn = True
        ax.set(title=title, xlabel="seconds into training")
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=7)
    if not drawn:
        fig.suptitle("no system metrics recorded (tracking off, or training shorter than one sample)")
    return _save(fig, Path(out_path))


def plot_speed(board: pd.DataFrame, out_path: str | Path) -> Path:
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    names = board["model"].tolist()
    ax1.bar(names, board["train_time_s"].fillna(0).tolist(), color="#d8873b")
    ax1.set(title="Training time (s)")
    ax2.bar(names, board["real_tokens_per_s"].fillna(0).tolist(), color="#3bd8a0")
    ax2.set(title="Real (non-padding) tokens per second")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3, axis="y")
    return _save(fig, Path(out_path))
