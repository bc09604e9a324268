"""Answering questions: prompts as training saw them, left padding, batched generation equal to one by one."""

from __future__ import annotations

import pytest
import torch

from pipeline_lib.architectures import ARCHS  # noqa: E402  (every family in the registry)
from pipeline_lib.config import InferenceSettings
from pipeline_lib.inference import generate_answers, left_pad, load_for_inference
from pipeline_lib.prompts import build_prompt

PROMPTS = [
    build_prompt("What is the capital city of Norway?"),
    build_prompt("Sort the numbers from smallest to largest.", "42, 7, 19, 3, 88, 61, 5"),
    build_prompt("Is 7 even or odd?"),
    build_prompt('Who wrote the novel "War and Peace"? Answer with the full name of the author, please.'),
]


def test_left_pad_puts_padding_before_the_prompt():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_token_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


class _Capture:
    """Wraps `model.generate` to record the input ids it is given."""

    def __init__(self, model):
        self.inputs: list[list[list[int]]] = []
        self._generate = model.generate
        model.generate = self

    def __call__(self, input_ids, attention_mask, **kw):
        self.inputs.append([row[m.bool()].tolist() for row, m in zip(input_ids, attention_mask, strict=True)])
        return self._generate(input_ids=input_ids, attention_mask=attention_mask, **kw)


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_answers_equal_one_by_one(arch, tiny_models):
    """Greedy answers of a batch of prompts of different lengths equal each prompt's answer alone: the
    padding (left, masked) is invisible to the model. Right padding, or padding without a mask, breaks this."""
    model, tok = load_for_inference(tiny_models[arch], "cpu")
    settings = InferenceSettings(max_new_tokens=12, batch_size=len(PROMPTS), repetition_penalty=1.0)
    capture = _Capture(model)
    batched = generate_answers(model, tok, PROMPTS, settings, "cpu")
    alone = [
        generate_answers(model, tok, [p], settings.model_copy(update={"batch_size": 1}), "cpu")[0]
        for p in PROMPTS
    ]
    assert [a["answer"] for a in batched] == [a["answer"] for a in alone]
    assert [a["new_tokens"] for a in batched] == [a["new_tokens"] for a in alone]
    assert any(a["new_tokens"] > 0 for a in batched)
    # The model saw exactly the prompt ids training lays out: the tokenizer's own encoding of the prompt
    # (the tiny tokenizers add only BOS, and only Llama's), with nothing after them.
    for prompt, seen in zip(PROMPTS, capture.inputs[0], strict=True):
        assert seen == tok(prompt)["input_ids"] and seen[-1] != tok.eos_token_id


def test_prompts_never_end_in_eos_with_a_tokenizer_that_appends_it(tiny_models, tmp_path):
    from tokenizers import processors

    model, tok = load_for_inference(tiny_models["llama"], "cpu")
    bos, eos = tok.bos_token, tok.eos_token
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, tok.bos_token_id), (eos, tok.eos_token_id)]
    )
    assert tok("Hi")["input_ids"][-1] == tok.eos_token_id
    capture = _Capture(model)
    generate_answers(model, tok, PROMPTS[:2], InferenceSettings(max_new_tokens=2), "cpu")
    for prompt, seen in zip(PROMPTS[:2], capture.inputs[0], strict=True):
        assert seen[-1] != tok.eos_token_id and seen == tok(prompt)["input_ids"][:-1]


def test_generation_is_deterministic(tiny_models):
    model, tok = load_for_inference(tiny_models["falcon"], "cpu")
    settings = InferenceSettings(max_new_tokens=8)
    first = generate_answers(model, tok, PROMPTS, settings, "cpu")
    torch.manual_seed(123)  # greedy decoding ignores the random state
    assert [a["answer"] for a in generate_answers(model, tok, PROMPTS, settings, "cpu")] == [
        a["answer"] for a in first
    ]


def test_the_answer_stage_gives_identical_answers_and_scores_twice(tiny_models, tmp_path):
    """Greedy answers of the same model to the same questions, scored: byte-identical files, same summary."""
    from pipeline_lib.inference import AnswerJob, answer_stage

    settings = InferenceSettings(question_set="builtin:smoke_question_set.md", max_new_tokens=10)
    runs = [
        answer_stage(
            AnswerJob(
                model_name="llama-tiny",
                model_dir=tiny_models["llama"],
                phase="before",
                settings=settings,
                device="cpu",
                out_path=str(tmp_path / f"{k}" / "answers_before.jsonl"),
            )
        )
        for k in range(2)
    ]
    first, second = ((tmp_path / f"{k}" / "answers_before.jsonl").read_bytes() for k in range(2))
    assert first == second and runs[0].fingerprint == runs[1].fingerprint
    assert runs[0].model_dump(exclude={"answers_path", "seconds"}) == runs[1].model_dump(
        exclude={"answers_path", "seconds"}
    )
    assert runs[0].n_questions == 12 and runs[0].phase == "before"
