"""The question set every model answers, parsed from its markdown table, and automatic scoring."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path


@dataclass(frozen=True)
class Question:
    id: int
    question: str
    kind: str  # fact | open | code | list
    reference: str
    answers: tuple[str, ...] = field(default_factory=tuple)  # accepted forms (fact)
    rubric: tuple[str, ...] = field(default_factory=tuple)  # keywords / criteria (open, code, list)


def _parse_reference(kind: str, ref: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    ref = ref.strip()
    if ref.startswith("rubric:"):
        return (), tuple(p.strip() for p in ref[len("rubric:") :].split(";") if p.strip())
    if kind == "list":
        body = ref.split(":", 1)[1] if ":" in ref else ref
        return (), tuple(p.strip() for p in body.split(",") if p.strip())
    if ref.lower() == "none":
        return (), ()
    return tuple(p.strip() for p in ref.split(" / ") if p.strip()), ()


def parse_question_set(text: str) -> list[Question]:
    """Rows of the markdown table `| id | question | kind | reference |`."""
    out: list[Question] = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 4 or not cells[0].isdigit():
            continue
        qid, question, kind, ref = int(cells[0]), cells[1], cells[2], "|".join(cells[3:])
        answers, rubric = _parse_reference(kind, ref)
        out.append(Question(qid, question, kind, ref, answers, rubric))
    if not out:
        raise ValueError("question set: no rows of the form '| id | question | kind | reference |' found")
    return out


def load_questions(path: str | Path | None = None) -> list[Question]:
    if path is None:
        text = resources.files("pipeline_lib.assets").joinpath("question_set.md").read_text(encoding="utf-8")
    else:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"{p}: question set file not found")
        text = p.read_text(encoding="utf-8")
    return parse_question_set(text)


def _norm(s: str) -> str:
    s = s.lower().replace("π", "pi").replace("²", "^2").replace("×", "*")
    return re.sub(r"\s+", " ", s)


_SYNONYMS = {  # list items with alternative spellings
    "ddos / denial of service": ("ddos", "denial of service", "denial-of-service"),
    "man-in-the-middle": ("man-in-the-middle", "man in the middle", "mitm"),
    "sql injection": ("sql injection",),
}


def score_answer(q: Question, answer: str) -> dict:
    """Automatic score in [0, 1] with what matched. fact: a reference form is present; list: share of the
    three items named; open/code: share of rubric keywords present (a rough signal, shown beside the text)."""
    a = _norm(answer)
    if q.kind == "fact" and q.answers:
        forms = [_norm(f) for f in q.answers]
        compact = a.replace(" ", "")
        hit = [f for f in forms if f in a or f.replace(" ", "") in compact]
        return {"score": 1.0 if hit else 0.0, "matched": hit, "method": "reference"}
    if q.kind == "list" and q.rubric:
        found = []
        for item in q.rubric:
            key = item.lower()
            forms = _SYNONYMS.get(key, tuple(f.strip() for f in key.split("/")))
            if any(f in a for f in forms):
                found.append(item)
        return {"score": min(len(found), 3) / 3, "matched": found, "method": "list"}
    if q.rubric:
        found = []
        for crit in q.rubric:
            words = [
                w for w in re.findall(r"[a-z]{4,}", crit.lower()) if w not in {"defines", "without", "what"}
            ]
            if words and any(w in a for w in words):
                found.append(crit)
        return {"score": len(found) / len(q.rubric), "matched": found, "method": "rubric-keywords"}
    return {"score": None, "matched": [], "method": "none"}
