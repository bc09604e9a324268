"""The comparison stage: one report a reader can trust, `compare_stage(job) -> Comparison`.

From the models' typed results (`contracts.ModelResult`) and their runs' logged series it writes, to the
report directory and the parent MLflow run (`comparison/`):

- `scoreboard.csv` (+ an MLflow table): one row per model — size, trainable parameters, 4-bit footprint, peak
  memory, training time, real tokens/s, mean CPU/GPU utilisation, final training loss, the held-out metrics
  before → after and the question score before → after;
- `answers.csv` (+ an MLflow table): question × model, before and after, each answer with its score and what
  matched;
- plots: `curves.png` (training loss and learning rate, overlaid), `heldout.png` (held-out bits per byte and
  question score, before and after), `system.png` (CPU/GPU utilisation and memory over time, from MLflow's
  system metrics), `speed.png` (training time and real tokens/s);
- `report.md`, in the technical report's shape (setup, training, evaluation, comparison, resource use,
  findings), every figure taken from the numbers above and every finding citing its number.

The best model is chosen on what held-out data and the question set say, never on training loss
(`BEST_RULE`); the report says so. Each model's headline metrics are also logged on the parent run
(`<model>.question_score`, ...), so the MLflow runs table compares runs at a glance.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import BaseModel, ConfigDict

from pipeline_lib.contracts import Comparison, ModelResult
from pipeline_lib.plots import plot_curves, plot_heldout, plot_speed, plot_system
from pipeline_lib.tracking import TrackingTarget, make_tracker

BEST_RULE = (
    "highest question score after fine-tuning; ties broken by the lowest held-out bits per byte "
    "(never by training loss, which is per token of each model's own tokenizer)"
)
SYSTEM_KEYS = {  # MLflow system-metric name -> (plot label, column)
    "system/cpu_utilization_percentage": ("CPU utilisation (%)", "cpu_util"),
    "system/gpu_0_utilization_percentage": ("GPU utilisation (%)", "gpu_util"),
    "system/system_memory_usage_megabytes": ("system memory (MB)", "ram_mb"),
    "system/gpu_0_memory_usage_megabytes": ("GPU memory (MB)", "gpu_mem_mb"),
}
HEADLINE = ("question_score", "question_score_before", "bits_per_byte", "bits_per_byte_before", "eval_loss")


def _read_jsonl(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


def _num(v: Any) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


# ---- tables --------------------------------------------------------------------------------------------------


def scoreboard(results: list[ModelResult], system: dict[str, dict[str, list]] | None = None) -> pd.DataFrame:
    """One row per model: size, cost and quality, before → after."""
    rows = []
    for r in results:
        m, q = r.train.metrics, r.train.quantization
        sysm = (system or {}).get(r.model_name, {})
        before = r.answers_before
        rows.append(
            {
                "model": r.model_name,
                "base_model": r.base_model,
                "params_m": q.get("params", 0) / 1e6 if q.get("params") else None,
                "trainable_params": r.train.trainable_params,
                "footprint_4bit_mib": q.get("footprint_bytes", 0) / 1024**2,
                "peak_memory_gib": m.peak_memory_gib,
                "train_time_s": m.train_runtime_s,
                "real_tokens_per_s": m.real_tokens_per_s,
                "mean_cpu_util": _mean([v for _, v in sysm.get("cpu_util", [])]),
                "mean_gpu_util": _mean([v for _, v in sysm.get("gpu_util", [])]),
                "steps": m.steps,
                "final_train_loss": m.final_loss,
                "eval_loss_before": _num(m.eval_loss_before),
                "eval_loss": _num(m.eval_loss),
                "perplexity_before": _num(m.perplexity_before),
                "perplexity": _num(m.perplexity),
                "bits_per_byte_before": _num(m.bits_per_byte_before),
                "bits_per_byte": _num(m.bits_per_byte),
                "question_score_before": before.question_score if before else None,
                "question_score": r.answers.question_score,
                "correct_before": before.n_correct if before else None,
                "correct": r.answers.n_correct,
                "questions": r.answers.n_questions,
            }
        )
    return pd.DataFrame(rows)


def best_model(board: pd.DataFrame) -> str | None:
    """The model `BEST_RULE` picks."""
    if board.empty:
        return None
    ranked = board.assign(
        _q=board["question_score"].fillna(-1.0), _b=board["bits_per_byte"].fillna(float("inf"))
    ).sort_values(["_q", "_b"], ascending=[False, True], kind="stable")
    return str(ranked.iloc[0]["model"])


def answers_table(results: list[ModelResult]) -> pd.DataFrame:
    """One row per question and model: the answer before and after fine-tuning, each with its score and what
    matched."""
    rows: dict[tuple[int, str], dict] = {}
    for r in results:
        for phase, res in (("before", r.answers_before), ("after", r.answers)):
            if res is None:
                continue
            for a in _read_jsonl(res.answers_path):
                row = rows.setdefault(
                    (a["id"], r.model_name),
                    {"id": a["id"], "question": a["question"], "kind": a["kind"], "model": r.model_name},
                )
                row[f"answer_{phase}"] = a["answer"]
                row[f"score_{phase}"] = a.get("score")
                row[f"matched_{phase}"] = "; ".join(map(str, a.get("matched") or []))
    cols = ["id", "question", "kind", "model"]
    for phase in ("before", "after"):
        cols += [f"answer_{phase}", f"score_{phase}", f"matched_{phase}"]
    return pd.DataFrame(list(rows.values()), columns=cols).sort_values(["id", "model"], kind="stable")


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


# ---- the report ----------------------------------------------------------------------------------------------


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:,.{digits}f}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def _md_table(rows: list[list[Any]], head: list[str]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _arrow(before: Any, after: Any) -> str:
    return f"{_fmt(before)} → {_fmt(after)}"


def findings(board: pd.DataFrame) -> list[str]:
    """Sentences a reader can check against the tables, each with its numbers."""
    out: list[str] = []
    if board.empty:
        return out
    best = best_model(board)
    row = board.set_index("model").loc[best]
    out.append(
        f"**{best}** is the best model by the rule ({BEST_RULE}): question score "
        f"{_arrow(row['question_score_before'], row['question_score'])}, held-out bits per byte "
        f"{_arrow(row['bits_per_byte_before'], row['bits_per_byte'])}."
    )
    for _, r in board.iterrows():
        b, a = r["bits_per_byte_before"], r["bits_per_byte"]
        if b is not None and a is not None and not (math.isnan(b) or math.isnan(a)) and b > 0:
            verb = "lowered" if a < b else "raised"
            out.append(
                f"Fine-tuning {verb} {r['model']}'s held-out bits per byte by {abs(b - a) / b:.0%} "
                f"({_fmt(b)} → {_fmt(a)}); its question score went {_arrow(r['question_score_before'], r['question_score'])} "
                f"({_fmt(r['correct'], 0)} of {r['questions']} answers right after)."
            )
    lowest_loss = board.sort_values("final_train_loss").iloc[0]["model"]
    if lowest_loss != best:
        out.append(
            f"The lowest final training loss ({lowest_loss}, {_fmt(board['final_train_loss'].min())}) does not make "
            "the best model: training loss is per token of each model's own tokenizer, so it does not compare models."
        )
    times = board.dropna(subset=["train_time_s"])
    if len(times) > 1:
        fast, slow = times.sort_values("train_time_s").iloc[0], times.sort_values("train_time_s").iloc[-1]
        out.append(
            f"{fast['model']} trained in {fast['train_time_s'] / slow['train_time_s']:.0%} of {slow['model']}'s time "
            f"({_fmt(fast['train_time_s'], 1)} s vs {_fmt(slow['train_time_s'], 1)} s)."
        )
    return out


def report_markdown(
    title: str,
    results: list[ModelResult],
    board: pd.DataFrame,
    answers: pd.DataFrame,
    context: dict[str, Any],
) -> str:
    setup_rows = [
        [
            r.model_name,
            r.base_model,
            r.model.arch,
            _fmt(b["params_m"], 1),
            _fmt(b["trainable_params"], 0),
            _fmt(b["footprint_4bit_mib"], 1),
            r.train.memory_plan.get("micro_batch", 0) * r.train.memory_plan.get("grad_accum", 0) or None,
            b["steps"],
        ]
        for r, (_, b) in zip(results, board.iterrows(), strict=True)
    ]
    training_rows = [
        [
            b["model"],
            b["steps"],
            b["final_train_loss"],
            b["train_time_s"],
            b["real_tokens_per_s"],
            b["peak_memory_gib"],
        ]
        for _, b in board.iterrows()
    ]
    eval_rows = [
        [
            b["model"],
            _arrow(b["eval_loss_before"], b["eval_loss"]),
            _arrow(b["perplexity_before"], b["perplexity"]),
            _arrow(b["bits_per_byte_before"], b["bits_per_byte"]),
            _arrow(b["question_score_before"], b["question_score"]),
        ]
        for _, b in board.iterrows()
    ]
    resource_rows = [
        [
            b["model"],
            b["train_time_s"],
            b["real_tokens_per_s"],
            b["peak_memory_gib"],
            b["mean_cpu_util"],
            b["mean_gpu_util"],
        ]
        for _, b in board.iterrows()
    ]
    qa = answers.assign(
        before=answers["answer_before"].fillna("").str.slice(0, 90),
        after=answers["answer_after"].fillna("").str.slice(0, 90),
    )
    qa_rows = [
        [
            a["id"],
            a["model"],
            a["before"],
            a["score_before"],
            a["after"],
            a["score_after"],
            a["matched_after"],
        ]
        for _, a in qa.iterrows()
    ]
    best = best_model(board)
    lines = [
        f"# {title}",
        "",
        "## Setup",
        "",
        f"Data: {context.get('data', '–')}. Held-out split: the rows of whole instruction groups the models never "
        "trained on. Every model: QLoRA (4-bit NF4 base, LoRA adapter), the same prompt template in training "
        "and answering, greedy answers.",
        "",
        _md_table(
            setup_rows,
            ["model", "base model", "family", "params (M)", "trainable", "4-bit GiB", "batch", "steps"],
        ),
        "",
        "## Training",
        "",
        _md_table(
            training_rows, ["model", "steps", "final train loss", "time (s)", "real tokens/s", "peak GiB"]
        ),
        "",
        "![training loss and learning rate](curves.png)",
        "",
        "## Evaluation",
        "",
        "Held-out metrics before fine-tuning (the base model) → after, on the same held-out rows: token-mean loss, "
        "perplexity, and bits per byte (summed negative log-likelihood / UTF-8 bytes of the responses / ln 2, "
        "comparable across tokenizers). Question score: the mean score over the question set "
        "(facts, equations, code and lists: correctness; open questions: rubric coverage).",
        "",
        _md_table(eval_rows, ["model", "eval loss", "perplexity", "bits per byte", "question score"]),
        "",
        "![held-out metrics and question score, before and after](heldout.png)",
        "",
        "## Comparison",
        "",
        f"Best model: **{best}** — rule: {BEST_RULE}.",
        "",
        "### Answers (first 90 characters; score and what matched after fine-tuning)",
        "",
        _md_table(qa_rows, ["id", "model", "before", "score", "after", "score", "matched"]),
        "",
        "## Resource use",
        "",
        _md_table(
            resource_rows, ["model", "time (s)", "real tokens/s", "peak GiB", "mean CPU %", "mean GPU %"]
        ),
        "",
        "![utilisation and memory over time](system.png) ![time and throughput](speed.png)",
        "",
        "## Findings",
        "",
        *[f"- {f}" for f in findings(board)],
        "",
    ]
    return "\n".join(lines)


# ---- the stage -----------------------------------------------------------------------------------------------


class CompareJob(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    results: list[ModelResult]
    out_dir: str
    title: str
    data: str = ""  # what the data was, for the report's setup (source, rows)
    tracking: TrackingTarget = TrackingTarget(uri=None, experiment="qabot")
    parent_run_id: str | None = None


def _system_series(tracker, results: list[ModelResult]) -> dict[str, dict[str, list]]:
    out: dict[str, dict[str, list]] = {}
    for r in results:
        series = {}
        for key, (_, column) in SYSTEM_KEYS.items():
            pts = tracker.metric_history(r.train.run_id, key)
            if pts:
                series[column] = pts
        out[r.model_name] = series
    return out


def compare_stage(job: CompareJob) -> Comparison:
    """Build the comparison (module docstring) and log it to the parent run."""
    out = Path(job.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tracker = make_tracker(job.tracking)
    system = _system_series(tracker, job.results) if job.tracking.enabled else {}
    board = scoreboard(job.results, system)
    answers = answers_table(job.results)
    histories = {}
    for r in job.results:
        hist_file = Path(r.train.adapter_dir).parent / "log_history.json"
        histories[r.model_name] = json.loads(hist_file.read_text()) if hist_file.exists() else []
    cdf = curves(histories)
    files = {
        "scoreboard.csv": out / "scoreboard.csv",
        "answers.csv": out / "answers.csv",
        "curves.csv": out / "curves.csv",
        "report.md": out / "report.md",
    }
    board.to_csv(files["scoreboard.csv"], index=False)
    answers.to_csv(files["answers.csv"], index=False)
    cdf.to_csv(files["curves.csv"], index=False)
    files["curves.png"] = plot_curves(cdf, out / "curves.png")
    files["heldout.png"] = plot_heldout(board, out / "heldout.png")
    files["system.png"] = plot_system(system, out / "system.png")
    files["speed.png"] = plot_speed(board, out / "speed.png")
    context = {"data": job.data}
    files["report.md"].write_text(
        report_markdown(job.title, job.results, board, answers, context), encoding="utf-8"
    )
    url = None
    if job.parent_run_id and job.tracking.enabled:
        run = job.parent_run_id
        for f in files.values():
            tracker.log_artifact(run, f, "comparison")
        tracker.log_table(run, board.to_dict(orient="records"), "comparison/scoreboard.json")
        tracker.log_table(run, answers.to_dict(orient="records"), "comparison/answers.json")
        tracker.log_dict(run, [r.to_json() for r in job.results], "comparison/results.json")  # for reruns
        headline = {
            f"{b['model']}.{k}": b[k]
            for _, b in board.iterrows()
            for k in HEADLINE
            if _num(b.get(k)) is not None
        }
        tracker.log_metrics(run, headline)
        tracker.set_tags(
            run,
            {
                "qabot.child_runs": ",".join(r.train.run_id for r in job.results),
                "qabot.best_model": best_model(board) or "",
            },
        )
        url = tracker.run_url(run)
    return Comparison(
        report_dir=str(out),
        files={k: str(v) for k, v in files.items()},
        parent_run_url=url,
        best_model=best_model(board),
        scoreboard=board.to_dict(orient="records"),
    )
