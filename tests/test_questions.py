from __future__ import annotations

import dataclasses

import pytest

from pipeline_lib.questions import load_questions, parse_question_set
from pipeline_lib.scoring import score_answer as _score


def score_answer(q, answer):
    return dataclasses.asdict(_score(q, answer))


def test_fifteen_questions_with_exact_wording():
    qs = load_questions()
    assert [q.id for q in qs] == list(range(1, 16))
    assert qs[0].question == "What is the capital city of Australia?"
    assert qs[12].question == "How would you solve the following equation: 3x + 5 = 17?"
    assert {q.kind for q in qs} == {"fact", "equation", "open", "code", "list"}


def test_builtin_set_carries_scoring_data():
    qs = {q.id: q for q in load_questions()}
    assert "Sydney" in qs[1].wrong
    assert qs[3].tests[0].args == ((1, 2), (3, 4)) and qs[3].tests[0].expected == (4, 6)
    assert (qs[13].kind, qs[13].variable, qs[13].value) == ("equation", "x", 4.0)
    assert qs[8].required == 3 and len(qs[8].items) == 12
    assert [c.name for c in qs[2].criteria] == ["speed of light", "space and time are relative", "Einstein"]
    assert qs[15].criteria == ()


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


TABLE = """| id | question | kind | reference |
|---|---|---|---|
| 1 | Capital of Norway? | fact | Oslo / Christiania |
| 2 | Solve 2x = 6 | equation | x = 3 |
| 3 | Name two colours | list | two of: red, green, blue / navy |
| 4 | Explain rain | open | rubric: clouds; water vapour / vapor |
"""


def test_table_only_question_set_keeps_the_simple_behaviour():
    q1, q2, q3, q4 = parse_question_set(TABLE)
    assert q1.answers == ("Oslo", "Christiania")
    assert score_answer(q1, "It is Oslo.")["score"] == 1.0
    assert score_answer(q1, "Bergen")["score"] == 0.0
    assert score_answer(q2, "x = 3")["score"] == 1.0
    assert (q3.required, score_answer(q3, "Red and navy.")["score"]) == (2, 1.0)
    assert score_answer(q4, "Clouds hold water vapor.")["score"] == 1.0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("```yaml\n1: {accept: [Oslo\n```\n", "question set.md: line 10: scoring data is not valid YAML"),
        (
            "```yaml\n1: {acept: [Oslo]}\n```\n",
            "question set.md: line 9: question 1: unknown key(s) ['acept']",
        ),
        ("```yaml\n9: {accept: [Oslo]}\n```\n", "question set.md: line 9: question 9: no such question"),
        ("```yaml\n2: {value: four}\n```\n", "question 2: value: expected a number"),
        ("```yaml\n4:\n  rubric: [{name: a, any: ['re:(']}]\n```\n", "bad regular expression"),
        ("```yaml\n- 1\n```\n", "scoring data must be a mapping keyed by question id"),
        ("| 5 | Q | guess | x |\n", "question set.md: line 8: question 5: unknown kind 'guess'"),
        ("| 1 | Again? | fact | x |\n", "question set.md: line 8: question id 1 given twice"),
        ("| 6 | Q |\n", "question set.md: line 8: expected '| id | question | kind | reference |'"),
    ],
)
def test_malformed_question_set_is_one_line_naming_file_and_line(extra, message):
    with pytest.raises(ValueError) as err:
        parse_question_set(TABLE + "\n" + extra, "question set.md")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_load_questions_names_a_missing_file(tmp_path):
    with pytest.raises(ValueError, match="question set file not found"):
        load_questions(tmp_path / "nope.md")
