"""Comparison artifacts across models: answers table, overlaid curves, cost table, markdown report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import BaseModel, ConfigDict

from pipeline_lib.contracts import Comparison, ModelResult
from pipeline_lib.tracking import TrackingTarget, make_tracker


def _read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def answers_table(answer_files: dict[str, str]) -> pd.DataFrame:
    """One row per question, one answer column (and one score column) per model."""
    frames = []
    for model, path in answer_files.items():
        df = pd.DataFrame(_read_jsonl(path))
        frames.append(df.assign(model=model))
    long = pd.concat(frames, ignore_index=True)
    wide = long.pivot(index=["id", "question", "kind"], columns="model", values="answer")
    scores = long.pivot(index=["id", "question", "kind"], columns="model", values="score")
    scores.columns = [f"score:{c}" for c in scores.columns]
    return wide.join(scores).reset_index().sort_values("id")


def curves(histories: dict[str, list[dict]]) -> pd.DataFrame:
    """Long table of step-wise training loss and learning rate per model."""
    rows = []
    for model, hist in histories.items():
        for h in hist:
            if "loss" in h or "learning_rate" in h:
                rows.append(
                    {
                        "model": model,
                        "step": h.get("step"),
                        "epoch": h.get("epoch"),
                        "loss": h.get("loss"),
                        "learning_rate": h.get("learning_rate"),
                    }
                )
    return pd.DataFrame(rows, columns=["model", "step", "epoch", "loss", "learning_rate"])


def plot_curves(curve_df: pd.DataFrame, out_path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    for model, g in curve_df.groupby("model"):
        gl = g.dropna(subset=["loss"])
        # x = share of the model's own training, so runs of different lengths overlay
        frac = gl["step"] / max(gl["step"].max(), 1)
        ax1.plot(frac, gl["loss"], label=model)
        glr = g.dropna(subset=["learning_rate"])
        ax2.plot(glr["step"] / max(glr["step"].max(), 1), glr["learning_rate"], label=model)
    ax1.set(title="Training loss", xlabel="share of training", ylabel="loss")
    ax2.set(title="Learning rate", xlabel="share of training", ylabel="lr")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def cost_table(results: list[ModelResult]) -> pd.DataFrame:
    rows = []
    for r in results:
        m, ans, q = r.train.metrics, r.answers, r.train.quantization
        rows.append(
            {
                "model": r.model_name,
                "base_model": r.base_model,
                "train_loss": m.train_loss,
                "eval_loss": m.eval_loss,
                "eval_bits_per_byte": m.eval_bits_per_byte,
                "steps": m.steps,
                "train_time_s": m.train_runtime_s,
                "real_tokens_per_s": m.real_tokens_per_s,
                "peak_memory_gib": m.peak_memory_gib,
                "share_4bit": q.get("share_4bit"),
                "footprint_gib": q.get("footprint_bytes", 0) / 1024**3,
                "fact_accuracy": ans.fact_accuracy,
                "mean_score": ans.mean_score,
                "answer_time_s": ans.seconds,
            }
        )
    return pd.DataFrame(rows)


def _md_table(df: pd.DataFrame) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v).replace("|", "\\|").replace("\n", " ")

    head = "| " + " | ".join(map(str, df.columns)) + " |"
    sep = "|" + "---|" * len(df.columns)
    body = ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, sep, *body])


def build_report(
    results: list[ModelResult], out_dir: str | Path, title: str = "qabot comparison"
) -> dict[str, str]:
    """Write answers.csv, curves.csv, curves.png, costs.csv and report.md to `out_dir`; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    answer_files = {r.model_name: r.answers.answers_path for r in results}
    table = answers_table(answer_files)
    table.to_csv(out / "answers.csv", index=False)
    histories = {}
    for r in results:
        hist_file = Path(r.train.adapter_dir).parent / "log_history.json"
        histories[r.model_name] = json.loads(hist_file.read_text()) if hist_file.exists() else []
    cdf = curves(histories)
    cdf.to_csv(out / "curves.csv", index=False)
    plot_curves(cdf, out / "curves.png")
    costs = cost_table(results)
    costs.to_csv(out / "costs.csv", index=False)
    models = [r.model_name for r in results]
    best = costs.sort_values("train_loss").iloc[0]["model"] if len(costs) else None
    ans_cols = ["id", "question", *models]
    lines = [
        f"# {title}",
        "",
        f"Models: {', '.join(models)}. Lowest training loss: **{best}**.",
        "",
        "## Training and cost",
        "",
        _md_table(costs),
        "",
        "![loss and learning rate](curves.png)",
        "",
        "## Scores per question (automatic: reference facts / rubric keywords)",
        "",
        _md_table(table[["id", "question", *[f"score:{m}" for m in models]]]),
        "",
        "## Answers",
        "",
        _md_table(table[ans_cols].assign(**{m: table[m].str.slice(0, 200) for m in models})),
        "",
    ]
    (out / "report.md").write_text("\n".join(lines), encoding="utf-8")
    return {
        name: str(out / name)
        for name in ("answers.csv", "curves.csv", "curves.png", "costs.csv", "report.md")
    }


class CompareJob(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    results: list[ModelResult]
    out_dir: str
    title: str
    tracking: TrackingTarget = TrackingTarget(uri=None, experiment="qabot")
    parent_run_id: str | None = None


def compare_stage(job: CompareJob) -> Comparison:
    """Build the comparison and log it to the parent run (artifacts under `comparison/`)."""
    files = build_report(job.results, job.out_dir, title=job.title)
    url = None
    if job.parent_run_id and job.tracking.enabled:
        tracker = make_tracker(job.tracking)
        for f in files.values():
            tracker.log_artifact(job.parent_run_id, f, "comparison")
        tracker.set_tags(
            job.parent_run_id, {"qabot.child_runs": ",".join(r.train.run_id for r in job.results)}
        )
        url = tracker.run_url(job.parent_run_id)
    return Comparison(report_dir=str(job.out_dir), files=files, parent_run_url=url)
