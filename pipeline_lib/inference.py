"""Answer the question set with a model directory, batched, with the same prompt template as training."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from pipeline_lib.config import InferenceSettings
from pipeline_lib.contracts import AnswerResult
from pipeline_lib.devices import resolve_device
from pipeline_lib.prompts import build_prompt
from pipeline_lib.questions import load_questions
from pipeline_lib.scoring import score_answer, summarize
from pipeline_lib.tracking import TrackingTarget, make_tracker


def load_for_inference(model_dir: str | Path, device: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tokenizer.padding_side = "left"  # generation continues every row from its last real token
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device)
    model.eval()
    return model, tokenizer


def left_pad(prompt_ids: list[list[int]], pad_token_id: int):
    """(input_ids, attention_mask) tensors with every row padded on the left, so generation continues each
    row right after its last real token."""
    import torch

    width = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), width), int(pad_token_id), dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for r, p in enumerate(prompt_ids):
        if p:
            ids[r, width - len(p) :] = torch.as_tensor(p, dtype=torch.long)
            mask[r, width - len(p) :] = 1
    return ids, mask


def generate_answers(
    model, tokenizer, prompts: list[str], settings: InferenceSettings, device: str
) -> list[dict]:
    """Greedy (or sampled) answers to `prompts`, `settings.batch_size` at a time; new tokens only.

    Prompts are tokenized exactly as in training (`tokenization.encode_prompts`: the tokenizer's prefix and
    the prompt text, nothing appended) and left-padded with an attention mask."""
    import torch

    from pipeline_lib.encoding import encode_prompts

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[dict] = []
    for start in range(0, len(prompts), settings.batch_size):
        chunk = prompts[start : start + settings.batch_size]
        input_ids, attention_mask = left_pad(encode_prompts(tokenizer, chunk), pad_id)
        t0 = time.time()
        with torch.inference_mode():
            gen = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=settings.max_new_tokens,
                do_sample=settings.do_sample,
                temperature=settings.temperature if settings.do_sample else None,
                top_p=None,
                top_k=None,
                repetition_penalty=settings.repetition_penalty,
                pad_token_id=pad_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        dt = time.time() - t0
        new = gen[:, input_ids.shape[1] :]
        for row in new:
            ids = row.tolist()
            if tokenizer.eos_token_id in ids:
                ids = ids[: ids.index(tokenizer.eos_token_id)]
            out.append(
                {
                    "answer": tokenizer.decode(ids, skip_special_tokens=True).strip(),
                    "new_tokens": len(ids),
                    "batch_seconds": dt,
                }
            )
    return out


class AnswerJob(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model_name: str
    model_dir: (
        str  # a model directory (weights + tokenizer): the base before fine-tuning, the merged one after
    )
    phase: Literal["before", "after"] = "after"  # before or after fine-tuning: names what is logged
    settings: InferenceSettings
    device: str = "auto"
    out_path: str  # answers.jsonl (answers_before.jsonl before fine-tuning): also its name in the run
    tracking: TrackingTarget = TrackingTarget(uri=None, experiment="qabot")
    run_id: str | None = None  # the model's run: answers and scores are logged there


def answer_stage(job: AnswerJob) -> AnswerResult:
    """Answer every question of the set with the model, score every answer (`pipeline_lib.scoring`), write
    them (JSONL) and log them: `question_score` (or `question_score_before`), the correctness and rubric
    coverage behind it, and `answers.jsonl` (or `answers_before.jsonl`)."""
    s = job.settings
    device = resolve_device(job.device)
    questions = load_questions(s.question_set)
    model, tokenizer = load_for_inference(job.model_dir, device)
    t0 = time.time()
    answers = generate_answers(model, tokenizer, [build_prompt(q.question) for q in questions], s, device)
    seconds = time.time() - t0
    rows, scores = [], []
    for q, a in zip(questions, answers, strict=True):
        sc = score_answer(q, a["answer"])
        scores.append(sc)
        rows.append(
            {
                "model": job.model_name,
                "phase": job.phase,
                "id": q.id,
                "question": q.question,
                "kind": q.kind,
                "answer": a["answer"],
                "new_tokens": a["new_tokens"],
                "score": sc.score,
                "correct": sc.correct,
                "matched": list(sc.matched),
                "score_method": sc.method,
            }
        )
    path = Path(job.out_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    path.write_text(text, encoding="utf-8")
    summary = summarize(scores)
    result = AnswerResult(
        model_name=job.model_name,
        phase=job.phase,
        answers_path=str(path),
        fingerprint=hashlib.sha256(text.encode()).hexdigest()[:16],
        n_questions=len(rows),
        question_score=summary["question_score"],
        correctness=summary["correctness"],
        rubric_coverage=summary["rubric_coverage"],
        n_correct=summary["n_correct"],
        seconds=seconds,
        new_tokens=sum(r["new_tokens"] for r in rows),
    )
    if job.run_id and job.tracking.enabled:
        suffix = "_before" if job.phase == "before" else ""
        tracker = make_tracker(job.tracking)
        tracker.log_artifact(job.run_id, path)
        numbers = {
            f"question_score{suffix}": result.question_score,
            f"question_correctness{suffix}": result.correctness,
            f"rubric_coverage{suffix}": result.rubric_coverage,
        }
        tracker.log_metrics(job.run_id, {k: v for k, v in numbers.items() if v is not None})
    return result
