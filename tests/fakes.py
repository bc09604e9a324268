"""Stage results made up for tests of what reads them (the comparison, the flow's wiring)."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline_lib.contracts import (
    AnswerResult,
    LengthStats,
    MergeResult,
    ModelResult,
    ResolvedModel,
    TokenizedData,
    TokenizedSplit,
    TrainMetrics,
    TrainResult,
)
from pipeline_lib.questions import load_questions


def resolved(name: str) -> ResolvedModel:
    return ResolvedModel(
        name=name, base_model=f"tiny:{name}", path=f"/m/{name}", revision=None, fingerprint=f"model-{name}",
        arch="llama", source="tiny",
    )  # fmt: skip


def split(name: str, kind: str) -> TokenizedSplit:
    return TokenizedSplit(
        path=f"/t/{name}/{kind}", fingerprint=f"{kind}-{name}", source=f"/d/{kind}.jsonl", tokenizer=f"/m/{name}",
        max_length=256, long_rows="cut", template_version="t", n_input_rows=10, n_rows=10, n_truncated=0,
        n_dropped=0, n_dropped_prompt=0, n_dropped_long=0, n_boundary_split=0, length_stats=LengthStats(),
        padding_free_tokens=100, response_bytes=200, label_tokens=50, seconds=0.1,
    )  # fmt: skip


def tokenized(name: str) -> TokenizedData:
    return TokenizedData(
        train=split(name, "train"), eval=split(name, "eval"), fingerprint=f"tok-{name}", data_fingerprint="data-fp",
        base_model=f"tiny:{name}", max_length=256, eval_max_length=2048, long_rows="cut",
    )  # fmt: skip


def trained(
    name: str,
    adapter_dir: str = "/a",
    loss: float = 1.0,
    run_id: str | None = None,
    bpb_before: float = 3.0,
    bpb: float = 2.0,
) -> TrainResult:
    metrics = TrainMetrics(
        train_loss=loss, final_loss=loss, eval_loss=loss + 0.1, bits_per_byte=bpb, eval_loss_before=loss + 1,
        bits_per_byte_before=bpb_before, perplexity=2.0, perplexity_before=7.0, train_runtime_s=3.0 * loss,
        train_tokens=900, real_tokens_per_s=100.0, steps=9, steps_run=9, peak_memory_gib=0.5,
    )  # fmt: skip
    return TrainResult(
        model_name=name, adapter_dir=adapter_dir, run_id=run_id or f"run-{name}", adapter_fingerprint=f"adapter-{name}",
        base_path=f"/m/{name}", arch="llama", device="cpu", metrics=metrics, memory_plan={}, lora_targets=["q_proj"],
        trainable_params=1000 + int(loss * 10), adapter_check={},
        quantization={"share_4bit": 1.0, "footprint_bytes": 1024**2, "params": 2_000_000},
    )  # fmt: skip


def merged(name: str) -> MergeResult:
    return MergeResult(merged_dir=f"/mm/{name}", fingerprint=f"merged-{name}", merge={}, fidelity={})


def answered(name: str, path: str = "/a.jsonl", phase: str = "after", score: float = 0.5) -> AnswerResult:
    return AnswerResult(
        model_name=name, phase=phase, answers_path=path, fingerprint=f"ans-{name}-{phase}", n_questions=15,
        question_score=score, correctness=score, rubric_coverage=None, n_correct=int(score * 10), seconds=1.0,
        new_tokens=10,
    )  # fmt: skip


def _answers_file(path: Path, name: str, phase: str, score: float) -> Path:
    prefix = name if phase == "after" else f"{name} before"
    path.write_text(
        "".join(
            json.dumps(
                {
                    "model": name,
                    "phase": phase,
                    "id": q.id,
                    "question": q.question,
                    "kind": q.kind,
                    "answer": f"{prefix} says {q.id}",
                    "score": score if q.kind == "fact" else None,
                    "matched": [],
                }
            )
            + "\n"
            for q in load_questions()
        )
    )
    return path


def model_result(
    tmp_path: Path,
    name: str,
    loss0: float,
    score_before: float = 0.0,
    score: float = 0.5,
    bpb_before: float = 3.0,
    bpb: float = 2.0,
) -> ModelResult:
    """A model with a loss curve and an answer per question before and after, on disk where the comparison
    reads them."""
    d = tmp_path / name
    (d / "adapter").mkdir(parents=True)
    hist = [
        {"step": s, "loss": loss0 / s, "learning_rate": 0.001 * (10 - s) / 10, "epoch": s / 10}
        for s in range(1, 10)
    ]
    (d / "log_history.json").write_text(json.dumps(hist))
    after = _answers_file(d / "answers.jsonl", name, "after", score)
    before = _answers_file(d / "answers_before.jsonl", name, "before", score_before)
    return ModelResult(
        model_name=name,
        base_model=f"tiny:{name}",
        model=resolved(name),
        tokenized=tokenized(name),
        train=trained(name, str(d / "adapter"), loss0, run_id=name, bpb_before=bpb_before, bpb=bpb),
        merge=merged(name),
        answers=answered(name, str(after), "after", score),
        answers_before=answered(name, str(before), "before", score_before),
    )
