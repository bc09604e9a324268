"""Scoring per kind of question, against a labelled set of answers; the code sandbox; `qabot score`."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline_lib.questions import load_questions, parse_question_set
from pipeline_lib.sandbox import extract_code, pick_function, run_tests
from pipeline_lib.scoring import Score, score_answer, score_file, solution_values, summarize

ROOT = Path(__file__).resolve().parent.parent
LABELLED = Path(__file__).parent / "data" / "labelled_answers.jsonl"
FAST_CODE = 2.0  # seconds a code answer may run in these tests (the question set allows 5)


@pytest.fixture(scope="module")
def qs() -> dict:
    out = {q.id: q for q in load_questions()}
    out[3] = dataclasses.replace(out[3], timeout_s=FAST_CODE)
    return out


def _agrees(row: dict, s: Score) -> bool:
    if "coverage" in row:
        lo, hi = row["coverage"]
        return s.score is not None and lo - 1e-6 <= s.score <= hi + 1e-6
    if row["label"] == "unscored":
        return s.score is None
    return s.correct is (row["label"] == "correct")


def test_scorers_agree_with_the_labelled_answers(qs):
    rows = [json.loads(line) for line in LABELLED.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(rows) >= 60 and {r["id"] for r in rows} == set(range(1, 16))
    disagree = []
    for r in rows:
        s = score_answer(qs[r["id"]], r["answer"])
        if not _agrees(r, s):
            disagree.append(f"q{r['id']} {r['answer']!r}: label {r.get('label', r.get('coverage'))}, got {s}")
    print(f"agreement {len(rows) - len(disagree)}/{len(rows)}", *disagree, sep="\n")
    assert (len(rows) - len(disagree)) / len(rows) >= 0.95, "\n".join(disagree)


# ---------------------------------------------------------------- the failures of the keyword scorer


@pytest.mark.parametrize(
    ("qid", "answer", "score"),
    [
        (1, "Sydney. (Not Canberra.)", 0.0),
        (13, "x = 42", 0.0),
        (6, "A = π × r²", 1.0),
        (6, "area = pi * r^2", 1.0),
        (2, "Sometimes I highlight things.", 0.0),
        (10, "No idea about the future.", 0.0),
    ],
)
def test_known_failures_of_keyword_scoring(qs, qid, answer, score):
    assert score_answer(qs[qid], answer).score == score


def test_vector_sum_is_right_and_dot_product_is_wrong(qs):
    vector_sum = score_answer(qs[3], "def add(a,b): return [x+y for x,y in zip(a,b)]")
    assert (vector_sum.score, vector_sum.correct, vector_sum.matched[0]) == (1.0, True, "4/4 tests passed")
    dot = score_answer(qs[3], "def dot(a, b):\n    return sum(x * y for x, y in zip(a, b))")
    assert (dot.score, dot.correct, dot.method) == (0.0, False, "code")


# ---------------------------------------------------------------- fact


@pytest.mark.parametrize(
    ("answer", "correct"),
    [
        ("Canberra.", True),
        ("canberra is the capital", True),
        ("It's Canberra, not Sydney.", True),
        ("Sydney is the largest city, but the capital is Canberra.", True),
        ("It is not Canberra.", False),
        ("The capital isn't Canberra.", False),
        ("Canberra is not the capital.", False),
        ("Sydney is the capital.", False),
        ("Sydney, Melbourne, Canberra or Perth.", False),
        ("Canberra or Sydney", False),
        ("Many people think it is Sydney; it is Canberra.", True),
        ("Sydney is a big city, but Canberra is the capital.", True),
        ("Canberrans", False),
    ],
)
def test_fact_negations_and_wrong_alternatives(qs, answer, correct):
    s = score_answer(qs[1], answer)
    assert (s.correct, s.method) == (correct, "fact")


def test_wrong_alternative_is_reported(qs):
    assert score_answer(qs[1], "Sydney. (Not Canberra.)").matched == ["wrong: Sydney"]
    assert score_answer(qs[7], "Neil Armstrong, followed by Buzz Aldrin.").correct is True
    assert score_answer(qs[7], "Neil Armstrong or Buzz Aldrin.").matched == [
        "wrong: Buzz Aldrin",
        "wrong: Aldrin",
    ]


@pytest.mark.parametrize(
    "answer",
    [
        "πr²",
        "pi r^2",
        "pi * r ** 2",
        "π × r²",
        "3.14 × r²",
        "math.pi * r**2",
        "A = πr^2",
        "return math.pi * radius ** 2",
        "r² × π",
        "π(r^2)",
        "pi times the radius squared",
        "π(d/2)²",
    ],
)
def test_circle_area_notations_accepted(qs, answer):
    assert score_answer(qs[6], answer).correct is True


@pytest.mark.parametrize("answer", ["2πr", "2πr²", "4πr²", "3πr²", "πr", "πr²/2", "It is either 2πr or πr²."])
def test_circle_area_wrong_formulas_rejected(qs, answer):
    assert score_answer(qs[6], answer).correct is False


def test_circumference_named_as_such_is_not_wrong(qs):
    assert score_answer(qs[6], "The circumference is 2πr; the area is πr².").correct is True


# ---------------------------------------------------------------- equation


@pytest.mark.parametrize(
    ("answer", "values"),
    [
        ("x = 4", [4]),
        ("x=4.0", [4]),
        ("x is 4", [4]),
        ("The answer is 4.", [4]),
        ("x equals four", [4]),
        ("3x = 12, so x = 12/3 = 4.", [4]),
        ("If x = 3 then 3*3 + 5 = 14; so x = 4.", [4]),
        ("Subtract 5 to get 12, then divide by 3 to get 4.", [4]),
        ("x = 42", [42]),
        ("x = -4", [-4]),
        ("x = 4 or x = 5", [4, 5]),
        ("Isolate x.", []),
    ],
)
def test_solution_values(answer, values):
    assert solution_values(answer, "x") == values


@pytest.mark.parametrize(
    ("answer", "correct"),
    [("x = 4", True), ("x=4.0", True), ("x = 42", False), ("x = 4 or x = 5", False), ("x = 22/3", False)],
)
def test_equation_scoring(qs, answer, correct):
    s = score_answer(qs[13], answer)
    assert (s.correct, s.method) == (correct, "equation")


# ---------------------------------------------------------------- list and rubric


@pytest.mark.parametrize(
    ("answer", "score", "found"),
    [
        ("Phishing, ransomware and DDoS attacks.", 1.0, 3),
        ("Malware, phishing and denial-of-service attacks.", 1.0, 3),
        ("Phishing, denial of service and DoS.", 2 / 3, 2),  # synonyms of one item count once
        ("Phishing, anti-virus programs and antivirus software.", 1 / 3, 1),
        ("Viruses, worms, trojans and spyware.", 1.0, 4),
    ],
)
def test_list_items(qs, answer, score, found):
    s = score_answer(qs[8], answer)
    assert s.score == pytest.approx(score) and len(s.matched) == found and s.method == "list"


def test_rubric_is_coverage_not_correctness(qs):
    s = score_answer(qs[14], "It learns patterns from data without being explicitly programmed.")
    assert (s.score, s.method, s.correct, s.meaning) == (1.0, "rubric", None, "rubric coverage")
    assert score_answer(qs[15], "Anything at all.") == Score(None, "none", [], None)


def test_rubric_phrases_match_whole_words_and_not_when_negated(qs):
    assert score_answer(qs[12], "Photosynthesis needs sunlight.").matched == ["light"]
    assert score_answer(qs[2], "Relativity has nothing to do with Einstein.").score == 0.0
    assert score_answer(qs[2], "I don't know.").matched == ["says it does not know"]
    assert score_answer(qs[2], "I don't know much, but Einstein did it.").matched == ["Einstein"]


# ---------------------------------------------------------------- finding the function in an answer


@pytest.mark.parametrize(
    "answer",
    [
        "```python\ndef add(a, b):\n    return a\n```\nOutput:\n```\n[4, 6]\n```",
        "Define it like this:\n\ndef add(a, b):\n    return a\n\nand call add([1], [2]).",
        "Use `def add(a, b): return a`.",
        ">>> def add(a, b):\n...     return a\n>>> add([1], [2])\n[1]",
    ],
)
def test_extract_code(answer):
    source, why = extract_code(answer)
    assert why is None and pick_function(source, 2) == "add"


def test_pick_function_prefers_hints_then_the_last():
    src = "def vector_add(a, b):\n    pass\n\ndef add(x, y):\n    return x + y\n\ndef plus(a, b, c):\n    pass\n"
    assert pick_function(src, 2, ["vector", "add"]) == "vector_add"
    assert pick_function(src, 2) == "add"
    assert pick_function("def one(a):\n    pass\n", 2) is None
    assert extract_code("```python\ndef add(a, b)\n    pass\n```")[0] is None


# ---------------------------------------------------------------- the sandbox

ESCAPES = """
import os, shutil, socket, subprocess

def attempt(kind, arg):
    if kind == "remove":
        os.remove(arg)
    elif kind == "rmtree":
        shutil.rmtree(arg)
    elif kind == "write":
        open(arg, "a").write("changed")
    elif kind == "connect":
        socket.create_connection(("127.0.0.1", 9), timeout=1)
    elif kind == "bind":
        socket.socket().bind(("127.0.0.1", 0))
    elif kind == "subprocess":
        subprocess.run(["touch", arg])
    elif kind == "system":
        os.system("touch " + arg)
    elif kind == "tamper":  # the hook's state is not the answer's to change
        import __main__

        __main__.SCRATCH = "/"
        open(arg, "w").write("tampered")
    elif kind == "memory":
        bytearray(4 << 30)
    elif kind == "scratch":  # its own directory is the child's to use
        open("note.txt", "w").write("ok")
        return os.path.realpath(os.getcwd()) == os.path.realpath(os.environ["HOME"])
    elif kind == "env":
        return "QABOT_TEST_SECRET" not in os.environ
    return "escaped"
"""


def test_sandbox_blocks_file_network_and_process_escapes(tmp_path, monkeypatch):
    monkeypatch.setenv("QABOT_TEST_SECRET", "do-not-leak")
    victim, kept_dir, marker = tmp_path / "victim.txt", tmp_path / "keep", tmp_path / "marker"
    victim.write_text("original")
    kept_dir.mkdir()
    (kept_dir / "f").write_text("x")
    escapes = [
        ("remove", str(victim)),
        ("rmtree", str(kept_dir)),
        ("write", str(victim)),
        ("connect", ""),
        ("bind", ""),
        ("subprocess", str(marker)),
        ("system", str(marker)),
        ("memory", ""),
        ("tamper", str(marker)),
    ]
    tests = [((k, a), "escaped") for k, a in escapes] + [(("scratch", ""), True), (("env", ""), True)]
    res = run_tests(ESCAPES, "attempt", tests, timeout_s=FAST_CODE * 2)
    assert (res.passed, res.total) == (2, len(tests)), res.errors
    for (kind, _arg), error in zip(escapes, res.errors, strict=False):
        expected = "MemoryError" if kind == "memory" else "PermissionError: sandbox:"
        assert error and error.startswith(expected), (kind, error)
    assert victim.read_text() == "original" and (kept_dir / "f").exists() and not marker.exists()
    assert not Path(res.scratch).exists(), "the scratch directory is removed afterwards"


@pytest.mark.parametrize("body", ["while True:\n        pass", "import time\n    time.sleep(60)"])
def test_sandbox_kills_an_infinite_loop_within_the_time_limit(body):
    t0 = time.monotonic()
    res = run_tests(f"def f(a, b):\n    {body}\n", "f", [((1, 2), 3)], timeout_s=1.0)
    assert res.timed_out and res.passed == 0
    assert time.monotonic() - t0 < 3.0
    assert not Path(res.scratch).exists()


# ---------------------------------------------------------------- files, summary and the command line


def test_summarize_separates_correctness_from_rubric_coverage():
    scores = [
        Score(1.0, "fact", ["Canberra"], True),
        Score(0.0, "equation", [], False),
        Score(0.5, "rubric", ["a"], None),
        Score(None, "none", [], None),
    ]
    s = summarize(scores)
    assert (s["question_score"], s["correctness"], s["rubric_coverage"]) == (0.5, 0.5, 0.5)
    assert (s["n_answers"], s["n_scored"], s["n_correct"], s["n_unscored"]) == (4, 3, 1, 1)


def test_score_file_keeps_extra_keys_and_writes_rows(tmp_path):
    answers = tmp_path / "answers.jsonl"
    answers.write_text(
        json.dumps({"id": 1, "answer": "Canberra", "model": "m"})
        + "\n\n"
        + json.dumps({"id": "13", "answer": "x = 42"})
        + "\n"
    )
    rows = score_file(answers, out_path=tmp_path / "out" / "scored.jsonl")
    written = [json.loads(x) for x in (tmp_path / "out" / "scored.jsonl").read_text().splitlines()]
    assert written == rows
    assert rows[0] == {
        "id": 1,
        "answer": "Canberra",
        "model": "m",
        "score": 1.0,
        "method": "fact",
        "matched": ["Canberra"],
        "correct": True,
        "meaning": "correctness",
    }
    assert (rows[1]["score"], rows[1]["method"]) == (0.0, "equation")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not JSON"),
        ('{"id": 1}', "missing 'answer'"),
        ('{"answer": "x"}', "missing 'id'"),
        ('{"id": 99, "answer": "x"}', "unknown question id 99"),
        ('{"id": 1, "answer": 3}', "'answer' must be a string"),
    ],
)
def test_score_file_rejects_malformed_lines(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"id": 1, "answer": "Canberra"}) + "\n" + line + "\n")
    with pytest.raises(ValueError) as err:
        score_file(path)
    assert str(err.value).startswith(f"{path}:2: ") and message in str(err.value)
    assert "\n" not in str(err.value)


def _qabot(*args):
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def test_cli_score(tmp_path):
    answers = tmp_path / "answers.jsonl"
    answers.write_text(
        '{"id": 1, "answer": "The capital is Canberra."}\n'
        '{"id": 13, "answer": "x = 4"}\n'
        '{"id": 2, "answer": "Einstein said the speed of light is constant."}\n'
        '{"id": 15, "answer": "Hard to say."}\n'
    )
    proc = _qabot("score", "--answers", str(answers), "--out", str(tmp_path / "scored.jsonl"))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["correctness"] == 1.0 and summary["rubric_coverage"] == pytest.approx(2 / 3)
    assert summary["n_answers"] == 4 and summary["n_unscored"] == 1
    rows = [json.loads(x) for x in (tmp_path / "scored.jsonl").read_text().splitlines()]
    assert [r["method"] for r in rows] == ["fact", "equation", "rubric", "none"]


def test_cli_score_malformed_input_is_one_line_and_exit_2(tmp_path):
    answers = tmp_path / "answers.jsonl"
    answers.write_text('{"id": 1, "answer": "Canberra"}\n{"id": 1, "text": "no answer key"}\n')
    proc = _qabot("score", "--answers", str(answers))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"qabot: error: {answers}:2: missing 'answer'"]


# ---------------------------------------------------------------- other question sets and old callers


def test_a_smoke_world_question_set_scores_with_the_same_scorers():
    text = """
| id | question | kind | reference |
|---|---|---|---|
| 1 | What is the capital city of Norway? | fact | Oslo |
| 2 | What is the capital city of Japan? | fact | Tokyo |

```yaml
1: {accept: [Oslo], wrong: [Bergen, Stockholm]}
```
"""
    q1, q2 = parse_question_set(text, "smoke.md")
    assert score_answer(q1, "Oslo.").correct is True
    assert score_answer(q1, "Bergen, not Oslo.").correct is False
    assert score_answer(q2, "It is Tokyo.").correct is True  # table only: the reference is the accepted form


def test_scoring_does_not_import_prefect_or_mlflow():
    code = "import sys, pipeline_lib.scoring; print(sorted({'prefect', 'mlflow'} & set(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "[]", proc.stderr
