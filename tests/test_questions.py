from __future__ import annotations

import pytest

from pipeline_lib.questions import load_questions, parse_question_set, score_answer


def test_fifteen_questions_with_exact_wording():
    qs = load_questions()
    assert [q.id for q in qs] == list(range(1, 16))
    assert qs[0].question == "What is the capital city of Australia?"
    assert qs[12].question == "How would you solve the following equation: 3x + 5 = 17?"
    assert {q.kind for q in qs} == {"fact", "open", "code", "list"}


@pytest.mark.parametrize(
    ("qid", "answer", "score"),
    [
        (1, "The capital of Australia is Canberra.", 1.0),
        (1, "Sydney is the capital.", 0.0),
        (4, "It was written by harper lee in 1960", 1.0),
        (5, "Table salt is NaCl (sodium chloride).", 1.0),
        (6, "Use A = πr².", 1.0),
        (6, "area = pi * r ** 2", 1.0),
        (6, "Multiply the radius by two.", 0.0),
        (11, "Van Gogh painted it.", 1.0),
        (13, "Subtract 5 and divide by 3: x = 4.", 1.0),
        (13, "x = 22/3", 0.0),
    ],
)
def test_fact_scoring(qid, answer, score):
    q = {q.id: q for q in load_questions()}[qid]
    assert score_answer(q, answer)["score"] == score


def test_list_and_rubric_scoring():
    qs = {q.id: q for q in load_questions()}
    assert score_answer(qs[8], "Phishing, ransomware and DDoS attacks.")["score"] == 1.0
    assert score_answer(qs[8], "Phishing only.")["score"] == pytest.approx(1 / 3)
    full = score_answer(qs[14], "It learns patterns from data without being explicitly programmed.")
    none = score_answer(qs[14], "It is a kind of magic.")
    assert full["score"] > none["score"]
    assert score_answer(qs[15], "anything")["score"] is None


def test_bad_question_set():
    with pytest.raises(ValueError, match="no rows"):
        parse_question_set("# nothing here\n")
