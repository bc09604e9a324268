"""The question set every model answers: its markdown table plus the data its scorers need.

A question set file is markdown. Its table `| id | question | kind | reference |` gives the questions; fenced
```yaml blocks after it (each a mapping keyed by question id) give what each kind of scorer needs:

    fact      accept: [forms]; wrong: [forms]; formulas / wrong_formulas: [expressions];
              symbols: {r: [radius]}; other_roles: [words that show a wrong form is named for another role]
    equation  variable: x; value: 4; tolerance: 1e-6
    code      tests: [{args: [...], expected: ...}]; function_hints: [names]; timeout_s: 5
    list      required: 3; items: {name: [forms]}
    open      rubric: [{name: ..., any: [forms]}]  (a form starting with `re:` is a regular expression)

A file with only the table still loads: a fact's forms are its reference split on " / ", an equation's
reference reads "x = 4", a list's "three of: a, b, c", an open question's "rubric: a; b; c".
Scoring itself is in `pipeline_lib.scoring`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from importlib import resources
from pathlib import Path
from typing import Any

KINDS = ("fact", "equation", "code", "list", "open")


@dataclass(frozen=True)
class Criterion:
    """One rubric criterion or list item: a name and the alternative phrases that show it."""

    name: str
    forms: tuple[str, ...]


@dataclass(frozen=True)
class CodeTest:
    """Call the answer's function with `args`; it should return `expected` (JSON values, lists as tuples)."""

    args: tuple[Any, ...]
    expected: Any


@dataclass(frozen=True)
class Question:
    id: int
    question: str
    kind: str  # fact | equation | code | list | open
    reference: str
    answers: tuple[str, ...] = ()  # fact: accepted forms
    rubric: tuple[str, ...] = ()  # names of the rubric criteria (open) or of the list items (list)
    # fact
    wrong: tuple[str, ...] = ()
    formulas: tuple[str, ...] = ()
    wrong_formulas: tuple[str, ...] = ()
    symbols: tuple[tuple[str, tuple[str, ...]], ...] = ()
    other_roles: tuple[str, ...] = ()
    # equation
    variable: str = "x"
    value: float | None = None
    tolerance: float = 1e-6
    # code
    tests: tuple[CodeTest, ...] = ()
    function_hints: tuple[str, ...] = ()
    timeout_s: float = 5.0
    # list
    items: tuple[Criterion, ...] = ()
    required: int = 0
    # open
    criteria: tuple[Criterion, ...] = ()


_NUMBER_WORDS = {w: i for i, w in enumerate("one two three four five six seven eight nine ten".split(), 1)}
_ALLOWED_KEYS = {
    "fact": {"accept", "wrong", "formulas", "wrong_formulas", "symbols", "other_roles"},
    "equation": {"variable", "value", "tolerance"},
    "code": {"tests", "function_hints", "timeout_s"},
    "list": {"items", "required"},
    "open": {"rubric"},
}


def _split_forms(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(" / ") if p.strip())


def _number(text: str) -> float | None:
    try:
        return float(Fraction(text.strip().replace(" ", "")))
    except (ValueError, ZeroDivisionError):
        return None


def _from_table(kind: str, ref: str) -> dict[str, Any]:
    """What a table-only row gives each scorer (the simple behaviour of a question set without YAML)."""
    ref = ref.strip()
    if ref.lower() in ("", "none"):
        return {}
    if ref.startswith("rubric:"):
        names = [p.strip() for p in ref[len("rubric:") :].split(";") if p.strip()]
        return {
            "rubric": tuple(names),
            "criteria": tuple(Criterion(n, _split_forms(n)) for n in names) if kind == "open" else (),
        }
    if kind == "list":
        head, sep, body = ref.partition(":")
        if not sep:
            head, body = "", ref
        names = [p.strip() for p in body.split(",") if p.strip()]
        m = re.match(r"\s*(\w+)\s+of\s*$", head)
        word = m.group(1).lower() if m else ""
        need = int(word) if word.isdigit() else _NUMBER_WORDS.get(word, len(names))
        return {
            "rubric": tuple(names),
            "items": tuple(Criterion(n, _split_forms(n)) for n in names),
            "required": need,
        }
    if kind == "equation":
        m = re.fullmatch(r"\s*([a-zA-Z])\s*=\s*(.+?)\s*", ref)
        value = _number(m.group(2)) if m else None
        return {"variable": m.group(1).lower(), "value": value} if m and value is not None else {}
    return {"answers": _split_forms(ref)} if kind == "fact" else {}


def _strings(v: Any, where: str) -> tuple[str, ...]:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, (str, int, float)) for s in v):
        raise ValueError(f"{where}: expected a list of strings")
    out = tuple(str(s).strip() for s in v if str(s).strip())
    for s in out:
        if s.startswith("re:"):
            try:
                re.compile(s[3:])
            except re.error as err:
                raise ValueError(f"{where}: bad regular expression {s!r}: {err}") from None
    return out


def _freeze(v: Any) -> Any:
    if isinstance(v, list):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((str(k), _freeze(x)) for k, x in v.items()))
    return v


def _criteria(v: Any, where: str, allow_strings: bool) -> tuple[Criterion, ...]:
    out = []
    if isinstance(v, dict):  # {name: [forms]}
        v = [{"name": k, "any": forms} for k, forms in v.items()]
    if not isinstance(v, list):
        raise ValueError(f"{where}: expected a list")
    for i, c in enumerate(v):
        if allow_strings and isinstance(c, str):
            out.append(Criterion(c, (c,)))
            continue
        if not isinstance(c, dict) or "name" not in c or set(c) - {"name", "any"}:
            raise ValueError(f"{where}[{i}]: expected {{name: ..., any: [forms]}}")
        forms = _strings(c.get("any", [c["name"]]), f"{where}[{i}].any")
        if not forms:
            raise ValueError(f"{where}[{i}]: no forms")
        out.append(Criterion(str(c["name"]), forms))
    return tuple(out)


def _from_yaml(kind: str, data: dict, where: str) -> dict[str, Any]:
    unknown = set(data) - _ALLOWED_KEYS[kind]
    if unknown:
        raise ValueError(
            f"{where}: unknown key(s) {sorted(map(str, unknown))} for a {kind} question "
            f"(allowed: {sorted(_ALLOWED_KEYS[kind])})"
        )
    out: dict[str, Any] = {}
    if kind == "fact":
        for key, attr in (("accept", "answers"), ("wrong", "wrong"), ("formulas", "formulas")):
            if key in data:
                out[attr] = _strings(data[key], f"{where}: {key}")
        for key in ("wrong_formulas", "other_roles"):
            if key in data:
                out[key] = _strings(data[key], f"{where}: {key}")
        if "symbols" in data:
            if not isinstance(data["symbols"], dict):
                raise ValueError(f"{where}: symbols: expected a mapping {{symbol: [words]}}")
            out["symbols"] = tuple(
                (str(k), _strings(w, f"{where}: symbols.{k}")) for k, w in data["symbols"].items()
            )
    elif kind == "equation":
        if "variable" in data:
            if not (isinstance(data["variable"], str) and re.fullmatch(r"[a-zA-Z]", data["variable"])):
                raise ValueError(f"{where}: variable: expected one letter")
            out["variable"] = data["variable"].lower()
        if "value" in data:
            value = _number(str(data["value"]))
            if value is None:
                raise ValueError(f"{where}: value: expected a number, got {data['value']!r}")
            out["value"] = value
        if "tolerance" in data:
            out["tolerance"] = float(data["tolerance"])
    elif kind == "code":
        tests = data.get("tests", [])
        if not isinstance(tests, list):
            raise ValueError(f"{where}: tests: expected a list")
        parsed = []
        for i, t in enumerate(tests):
            if not isinstance(t, dict) or set(t) != {"args", "expected"} or not isinstance(t["args"], list):
                raise ValueError(f"{where}: tests[{i}]: expected {{args: [...], expected: ...}}")
            parsed.append(CodeTest(_freeze(t["args"]), _freeze(t["expected"])))
        if len({len(t.args) for t in parsed}) > 1:
            raise ValueError(f"{where}: tests: every test must pass the same number of arguments")
        out["tests"] = tuple(parsed)
        if "function_hints" in data:
            out["function_hints"] = _strings(data["function_hints"], f"{where}: function_hints")
        if "timeout_s" in data:
            t = data["timeout_s"]
            if not isinstance(t, (int, float)) or not 0 < t <= 60:
                raise ValueError(f"{where}: timeout_s: expected seconds in (0, 60]")
            out["timeout_s"] = float(t)
    elif kind == "list":
        if "items" in data:
            out["items"] = _criteria(data["items"], f"{where}: items", allow_strings=True)
            out["rubric"] = tuple(c.name for c in out["items"])
        if "required" in data:
            if not isinstance(data["required"], int) or data["required"] < 1:
                raise ValueError(f"{where}: required: expected a positive integer")
            out["required"] = data["required"]
    elif kind == "open":
        out["criteria"] = _criteria(data.get("rubric") or [], f"{where}: rubric", allow_strings=True)
        out["rubric"] = tuple(c.name for c in out["criteria"])
    return out


_YAML_BLOCK = re.compile(r"^```ya?ml[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)


def _scoring_data(text: str, source: str) -> dict[int, tuple[dict, str]]:
    """{id: (data, where)} from every ```yaml block of the file."""
    import yaml

    out: dict[int, tuple[dict, str]] = {}
    for m in _YAML_BLOCK.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        try:
            block = yaml.safe_load(m.group(1))
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            at = line + 1 + mark.line if mark is not None else line
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ValueError(f"{source}: line {at}: scoring data is not valid YAML: {problem}") from None
        if block is None:
            continue
        if not isinstance(block, dict):
            raise ValueError(f"{source}: line {line}: scoring data must be a mapping keyed by question id")
        for key, data in block.items():
            if isinstance(key, bool) or not isinstance(key, int):
                raise ValueError(f"{source}: line {line}: scoring data key {key!r} is not a question id")
            if key in out:
                raise ValueError(f"{source}: line {line}: scoring data for question {key} given twice")
            if not isinstance(data, dict):
                raise ValueError(f"{source}: line {line}: scoring data for question {key} must be a mapping")
            at = re.search(rf"^{key}[ \t]*:", m.group(1), re.M)
            key_line = line + 1 + m.group(1).count("\n", 0, at.start()) if at else line
            out[key] = (data, f"{source}: line {key_line}: question {key}")
    return out


def parse_question_set(text: str, source: str = "question set") -> list[Question]:
    """Rows of the markdown table `| id | question | kind | reference |`, with their scoring data."""
    rows: list[tuple[int, str, str, str, int]] = []
    in_fence = False
    for n, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
            continue
        s = line.strip()
        if in_fence or not s.startswith("|"):
            continue
        cells = [c.strip() for c in s.strip("|").split("|")]
        if not cells[0].isdigit():
            continue
        if len(cells) < 4:
            raise ValueError(f"{source}: line {n}: expected '| id | question | kind | reference |'")
        qid, question, kind, ref = int(cells[0]), cells[1], cells[2].lower(), "|".join(cells[3:])
        if not question:
            raise ValueError(f"{source}: line {n}: question {qid} has no text")
        if kind not in KINDS:
            raise ValueError(
                f"{source}: line {n}: question {qid}: unknown kind {kind!r} (one of {', '.join(KINDS)})"
            )
        if any(r[0] == qid for r in rows):
            raise ValueError(f"{source}: line {n}: question id {qid} given twice")
        rows.append((qid, question, kind, ref, n))
    if not rows:
        raise ValueError(f"{source}: no rows of the form '| id | question | kind | reference |' found")
    data = _scoring_data(text, source)
    unknown = sorted(set(data) - {r[0] for r in rows})
    if unknown:
        raise ValueError(f"{data[unknown[0]][1]}: no such question in the table")
    out: list[Question] = []
    for qid, question, kind, ref, _n in rows:
        fields = _from_table(kind, ref)
        if qid in data:
            fields.update(_from_yaml(kind, *data[qid]))
        out.append(Question(qid, question, kind, ref, **fields))
    return out


BUILTIN_PREFIX = "builtin:"


def load_questions(path: str | Path | None = None) -> list[Question]:
    """A question set: None = the report's 15 questions, `builtin:NAME` = a set shipped with qabot (e.g.
    `builtin:smoke_question_set.md`), else a markdown file."""
    if path is None or str(path).startswith(BUILTIN_PREFIX):
        name = str(path).removeprefix(BUILTIN_PREFIX) if path is not None else "question_set.md"
        asset = resources.files("pipeline_lib.assets").joinpath(name)
        if not name.endswith(".md") or "/" in name or not asset.is_file():
            raise ValueError(f"{path}: no question set of that name is shipped with qabot")
        return parse_question_set(asset.read_text(encoding="utf-8"), name)
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p}: question set file not found")
    return parse_question_set(p.read_text(encoding="utf-8"), str(p))


def question_set_fingerprint(path: str | Path | None = None) -> str:
    """Content hash of a question set (its questions and scoring data, as parsed)."""
    import hashlib
    import json
    from dataclasses import asdict

    qs = [asdict(q) if hasattr(q, "__dataclass_fields__") else q for q in load_questions(path)]
    return hashlib.sha256(json.dumps(qs, sort_keys=True, default=str).encode()).hexdigest()[:16]
