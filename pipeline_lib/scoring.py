"""Automatic scoring of answers to the question set, one scorer per kind of question.

    fact      a reference form (or formula) stated and not negated, and no listed wrong alternative asserted
    equation  the value(s) the answer gives for the variable, compared numerically; several values are wrong
    code      the answer's function run on the question's test cases in a sandbox; score = share passed
    list      distinct valid items named (synonyms allowed); score = min(found, required) / required
    open      rubric coverage: share of criteria whose phrases appear, not negated (never "correctness")

Matching is on normalised text (lower case, accents dropped, π→pi, ²→^2, ×/·→*, unicode quotes and dashes)
and at word boundaries, never as substrings. No imports of prefect or mlflow here: this runs anywhere.

About 600 lines on purpose: every scorer shares the same text normalisation, negation and hedging rules, and
reading them in one place is what lets a reviewer check that no kind of question is easier to game.
"""

from __future__ import annotations

import ast
import functools
import itertools
import json
import operator
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from pipeline_lib.questions import Question, load_questions

CORRECTNESS_METHODS = ("fact", "equation", "code", "list")
MEANING = {
    "fact": "correctness",
    "equation": "correctness",
    "code": "correctness",
    "list": "correctness",
    "rubric": "rubric coverage",
    "none": "not scored",
}


@dataclass(frozen=True)
class Score:
    score: float | None  # in [0, 1]; None when the question has nothing to score against
    method: str  # fact | equation | code | list | rubric | none
    # what matched, the wrong form found ("wrong: Sydney"), or for code "3/4 tests passed"
    matched: list[str] = field(default_factory=list)
    correct: bool | None = None  # None for open questions (rubric) and unscored ones

    @property
    def meaning(self) -> str:
        return MEANING.get(self.method, "not scored")


# ---------------------------------------------------------------- text

_REPLACE = {
    "π": " pi ",
    "Π": " pi ",
    "²": "^2",
    "³": "^3",
    "×": "*",
    "·": "*",
    "⋅": "*",
    "∙": "*",
    "÷": "/",
    "−": "-",
    "–": " - ",
    "—": " - ",
    "‘": "'",
    "’": "'",
    "ʼ": "'",
    "“": '"',
    "”": '"',
    "≈": "=",
    "≠": "!=",
}


def normalize(text: str) -> str:
    """Lower case, accents dropped, maths symbols spelled in ASCII, runs of spaces (not newlines) collapsed."""
    for a, b in _REPLACE.items():
        text = text.replace(a, b)
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).lower()
    return re.sub(r"[^\S\n]+", " ", text)


@functools.lru_cache(maxsize=4096)
def form_regex(form: str, plural: bool = False) -> re.Pattern[str]:
    """A phrase (words separated by spaces or hyphens; `*` = any word ending) or `re:<regex>`, at word
    boundaries; a word preceded by `word-` (as in anti-virus) does not count."""
    if form.startswith("re:"):
        body = form[3:].strip()
    else:
        words = [w for w in re.split(r"[\s-]+", normalize(form).strip()) if w]
        body = r"[\s-]+".join(re.escape(w).replace(r"\*", r"\w*") for w in words)
    if plural:
        body = rf"(?:{body})(?:e?s)?"
    return re.compile(rf"(?<!\w)(?<!\w-)(?:{body})(?!\w)", re.I)


@dataclass(frozen=True)
class _Clause:
    text: str
    sentence: int


_BOUNDARY = re.compile(
    r"(?P<sent>[.!?]+(?=\s|$)|\n+)|(?P<clause>[;:,()\[\]]|\s-\s)"
    r"|(?=\b(?:but|however|yet|although|though|whereas|while|instead|rather)\b)"
)


_PARENS = re.compile(r"\(([^()\n]{0,40})\)")


def _mask_math_parens(text: str) -> str:
    """Parentheses around maths ("π(d/2)²", "(r^2)") are not clause boundaries; those around prose are."""

    def mask(m: re.Match[str]) -> str:
        words = [w for w in re.findall(r"[a-z]{2,}", m.group(1)) if w != "pi"]
        return f"\x01{m.group(1)}\x02" if len(words) <= 1 else m.group(0)

    return _PARENS.sub(mask, text)


def _clauses(text: str) -> list[_Clause]:
    text = _mask_math_parens(text)
    out: list[_Clause] = []
    sentence, pos = 0, 0
    for m in _BOUNDARY.finditer(text):
        if m.start() > pos and text[pos : m.start()].strip():
            out.append(_Clause(_unmask(text[pos : m.start()]), sentence))
        pos = max(pos, m.end())
        if m.group("sent"):
            sentence += 1
    if text[pos:].strip():
        out.append(_Clause(_unmask(text[pos:]), sentence))
    return out


def _unmask(text: str) -> str:
    return text.replace("\x01", "(").replace("\x02", ")")


_NEG_WORD = re.compile(r"(?:not|no|never|nor|neither|nothing|none|cannot|\w+n't)")
_NEG_TAIL = re.compile(
    r"\b(?:rather than|instead of|other than|as opposed to|except|unlike)\s+(?:\S+\s+){0,2}$"
)
_NEG_AFTER = re.compile(
    r"\s*(?:(?:is|was|are|were|does|did|do|has|had)\s+(?:not|never)\b"
    r"|(?:isn't|wasn't|aren't|weren't|doesn't|didn't|don't|hasn't|hadn't)\b)"
)
_NOT_A_NEGATION = re.compile(
    r"\b(?:no doubt|not only|not just|no matter|no longer|not sure|not completely)\b"
)


def _negated_before(prefix: str, window: int = 4) -> bool:
    prefix = _NOT_A_NEGATION.sub(" ", prefix)
    words = re.findall(r"[\w']+", prefix)[-window:]
    return any(_NEG_WORD.fullmatch(w) for w in words) or bool(_NEG_TAIL.search(prefix))


def _negated(clause: str, start: int, end: int) -> bool:
    """A mention at clause[start:end] is negated by a cue just before it ("not", "isn't", "rather than") or
    right after it ("... is not", "... isn't")."""
    return _negated_before(clause[:start]) or bool(_NEG_AFTER.match(clause[end:]))


def _find(forms: Iterable[str], clauses: Sequence[_Clause], plural: bool = False):
    """(form, clause index, negated) of every mention; for a `re:` form, the text it matched."""
    for form in forms:
        rx = form_regex(form, plural)
        for ci, c in enumerate(clauses):
            for m in rx.finditer(c.text):
                shown = m.group(0) if form.startswith("re:") else form
                yield shown, ci, _negated(c.text, m.start(), m.end())


# ---------------------------------------------------------------- fact


_BELIEF = re.compile(
    r"\b(?:(?:people|many|some|most|others|often|commonly|popularly|frequently|usually)\b[^.;]*?"
    r"\b(?:think|thinks|thought|believe|believes|believed|assume|assumes|assumed|guess|guesses|say|says|"
    r"confuse|confused|mistake|mistakes|mistaken)"
    r"|misconceptions?|mistaken(?:ly)?|wrongly|confused with|contrary to|although|though|while|whereas|"
    r"unlike|despite)\b"
)
_CONTRAST = re.compile(r"^\s*(?:but|however|yet|instead|rather)\b|\b(?:actually|in fact|in reality)\b")
DEFAULT_OTHER_ROLES = (
    "largest",
    "biggest",
    "most populous",
    "larger",
    "bigger",
    "second",
    "followed",
    "along with",
    "alongside",
    "accompanied",
    "joined",
)


@dataclass(frozen=True)
class _Mention:
    form: str
    clause: int
    negated: bool
    discounted: bool  # named in a belief, a concession, or another role ("largest city", "followed by")


_MATH_PRE = (
    (re.compile(r"\b(?:math|np|numpy|torch|sympy|cmath)\s*\.\s*pi\b"), " pi "),
    (re.compile(r"\*\*"), "^"),
    (re.compile(r"\b(?:math\.)?pow\(\s*([\w.]+)\s*,\s*([\d.]+)\s*\)"), r"\1^\2"),
    (re.compile(r"\b(?:the\s+)?square\s+of\s+(?:the\s+)?([a-z]\w*)"), r"\1^2"),
    (re.compile(r"\bsquared\b"), "^2"),
    (re.compile(r"\bcubed\b"), "^3"),
    (re.compile(r"\b(?:multiplied\s+by|times)\b"), "*"),
    (re.compile(r"\bdivided\s+by\b"), "/"),
)
_MATH_TOKEN = re.compile(r"\d+(?:\.\d+)?|[a-z_]\w*|[\^()*/+\-=]|\S")
_NEUTRAL = {"the", "by"}


def _compact(text: str, symbols: Mapping[str, str]) -> str:
    """Maths in `text` as a compact string: multiplication implicit, pi as π, words for symbols replaced
    (radius → r), any other word a `|` that breaks an expression. "A = pi * radius ** 2" → "a=πr^2"."""
    for rx, repl in _MATH_PRE:
        text = rx.sub(repl, text)
    out = []
    for tok in _MATH_TOKEN.findall(text):
        if tok[0].isdigit():
            out.append("π" if re.fullmatch(r"3\.14\d*", tok) else tok)
        elif tok[0].isalpha() or tok[0] == "_":
            if tok == "pi":
                out.append("π")
            elif tok in symbols:
                out.append(symbols[tok])
            elif tok in _NEUTRAL:
                continue
            elif len(tok) == 1:
                out.append(tok)
            elif re.fullmatch(r"pi[a-z]", tok):
                out.append("π" + symbols.get(tok[2], tok[2]))
            else:
                out.append("|")
        elif tok == "*":
            continue
        elif tok in "^()/+-=":
            out.append(tok)
        else:
            out.append("|")
    s = "".join(out)
    for _ in range(3):
        s = re.sub(r"\(([a-zπ]|\d+|[a-z]\^\d+)\)", r"\1", s)
        s = re.sub(r"\^\((\d+)\)", r"^\1", s)
        s = re.sub(r"(?<![a-z^])([a-z])\1(?![a-z^])", r"\1^2", s)
    return s


_FACTOR = re.compile(r"π|\d+(?:\.\d+)?|[a-z](?:\^\d+)?|\([^()]*\)(?:\^\d+)?")


@functools.lru_cache(maxsize=512)
def _formula_regex(formula: str, symbols: tuple[tuple[str, str], ...]) -> re.Pattern[str]:
    c = _compact(normalize(formula), dict(symbols))
    factors = _FACTOR.findall(c)
    variants = {c}
    if "".join(factors) == c and 1 < len(factors) <= 4:
        variants |= {"".join(p) for p in itertools.permutations(factors)}
    body = "|".join(re.escape(v) for v in sorted(variants, key=len, reverse=True))
    return re.compile(rf"(?<![\w.^)π/])(?:{body})(?![\w(^π]|[/.]\d|/[\wπ(])")


def _symbol_map(q: Question) -> tuple[tuple[str, str], ...]:
    pairs = []
    for sym, words in q.symbols:
        pairs.append((normalize(sym).strip(), normalize(sym).strip()))
        pairs += [(normalize(w).strip(), normalize(sym).strip()) for w in words]
    return tuple(pairs)


def _fact_mentions(q: Question, clauses: Sequence[_Clause], wrong: bool) -> list[_Mention]:
    forms = q.wrong if wrong else q.answers
    formulas = q.wrong_formulas if wrong else q.formulas
    roles = [*DEFAULT_OTHER_ROLES, *q.other_roles] if wrong else []
    role_rx = [form_regex(r) for r in roles]

    def discounted(ci: int) -> bool:
        text = clauses[ci].text
        return bool(_BELIEF.search(text)) or any(rx.search(text) for rx in role_rx)

    out = [_Mention(f, ci, neg, discounted(ci)) for f, ci, neg in _find(forms, clauses)]
    if formulas:
        symbols = _symbol_map(q)
        sym_map = dict(symbols)
        for ci, c in enumerate(clauses):
            compact = _compact(c.text, sym_map)
            neg = any(_NEG_WORD.fullmatch(w) for w in re.findall(r"[\w']+", _NOT_A_NEGATION.sub(" ", c.text)))
            for f in formulas:
                if _formula_regex(f, symbols).search(compact):
                    out.append(_Mention(f, ci, neg, discounted(ci)))
    return out


def _live(mentions: list[_Mention], opposite: list[_Mention], clauses: Sequence[_Clause]) -> list[_Mention]:
    """Mentions that stand: not negated, not discounted, and not taken back by a later contrasting clause
    ("..., but it's actually X") that names the opposite."""
    later_contrast = {
        m.clause for m in opposite if not m.negated and _CONTRAST.search(clauses[m.clause].text)
    }
    return [
        m
        for m in mentions
        if not m.negated and not m.discounted and not any(ci > m.clause for ci in later_contrast)
    ]


def _score_fact(q: Question, answer: str) -> Score:
    clauses = _clauses(normalize(answer))
    right = _fact_mentions(q, clauses, wrong=False)
    wrong = _fact_mentions(q, clauses, wrong=True)
    right_live, wrong_live = _live(right, wrong, clauses), _live(wrong, right, clauses)
    if wrong_live:
        return Score(0.0, "fact", _unique(f"wrong: {m.form}" for m in wrong_live), False)
    if right_live:
        return Score(1.0, "fact", _unique(m.form for m in right_live), True)
    negated = _unique(f"negated: {m.form}" for m in right if m.negated)
    return Score(0.0, "fact", negated, False)


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


# ---------------------------------------------------------------- equation

_NUMBER_WORDS = {
    w: str(i)
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
        "sixteen seventeen eighteen nineteen twenty".split()
    )
}
_CHAIN = r"[-+]?\s*[\d(][-+*/^().\d\s=]*"
_HYPOTHETICAL = re.compile(
    r"^(?:if|suppose|supposing|assume|assuming|try|trying|say|plug\w*|substitut\w*|check\w*|test\w*|when|"
    r"guess|let's|whether|not)$"
)
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _arith(expr: str) -> Fraction | None:
    """Value of a small arithmetic expression (numbers, + - * / ^, parentheses), or None."""
    try:
        tree = ast.parse(expr.replace("^", "**").strip(), mode="eval")
    except (SyntaxError, ValueError):
        return None

    def ev(n: ast.AST) -> Fraction:
        if isinstance(n, ast.Expression):
            return ev(n.body)
        if isinstance(n, ast.Constant) and type(n.value) in (int, float):
            return Fraction(n.value)
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, (ast.USub, ast.UAdd)):
            return -ev(n.operand) if isinstance(n.op, ast.USub) else ev(n.operand)
        if isinstance(n, ast.BinOp) and type(n.op) in _OPS:
            return _OPS[type(n.op)](ev(n.left), ev(n.right))
        if isinstance(n, ast.BinOp) and isinstance(n.op, ast.Pow):
            base, exp = ev(n.left), ev(n.right)
            if exp.denominator == 1 and abs(exp) <= 10:
                return base ** int(exp)
        raise ValueError("not arithmetic")

    try:
        return ev(tree)
    except (ValueError, ZeroDivisionError, OverflowError):
        return None


def _chain_value(chain: str) -> Fraction | None:
    """The final value of "12/3 = 4" (the last part that is a number or an expression)."""
    for part in reversed([p.strip().rstrip(".").strip() for p in chain.split("=") if p.strip()]):
        value = _arith(part)
        if value is None:
            lead = re.match(r"[-+]?\s*\d+(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?", part)
            value = _arith(lead.group(0)) if lead else None
        if value is not None:
            return value
    return None


def solution_values(answer: str, variable: str = "x") -> list[float]:
    """The values an answer gives for `variable`: "x = 4", "x=4.0", "x is 4", "the answer is 4", the last of
    "x = 12/3 = 4"; values named in a check ("if x = 3, ...") are left out. With none of these, the value after
    the last "to get" / "gives" / "leaves"."""
    text = normalize(answer)
    text = re.sub(r"\b(?:" + "|".join(_NUMBER_WORDS) + r")\b", lambda m: _NUMBER_WORDS[m.group(0)], text)
    v = re.escape(variable)
    claims = [
        rf"(?<![\w.]){v}\s*(?:=|:=|==|=>|->|is equal to|equals|would be|will be|must be|should be|is)\s*"
        rf"(?P<e>{_CHAIN})",
        rf"\b(?:answer|solution|result|value of {v})\s*(?:is|:|=|would be|will be)\s*(?:{v}\s*=\s*)?"
        rf"(?P<e>{_CHAIN})",
    ]
    found: list[tuple[int, Fraction]] = []
    for pattern in claims:
        for m in re.finditer(pattern, text):
            chain = m.group("e")
            if re.match(r"[-+]?\s*[\d.]+[a-z]", text[m.start("e") :]):
                continue  # "x = 3x ..." is not a value
            if any(_HYPOTHETICAL.fullmatch(w) for w in re.findall(r"[\w']+", text[: m.start()])[-3:]):
                continue
            value = _chain_value(chain)
            if value is not None:
                found.append((m.start(), value))
    if not found:
        fallback = (
            rf"\b(?:get|gets|getting|gives|give|giving|obtain|leaves|leaving|find|results in|yields)\s+"
            rf"(?:us\s+)?(?:{v}\s*=\s*)?(?P<e>[-+]?\d+(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?)(?!\s*[a-z(\d])"
        )
        for m in re.finditer(fallback, text):
            value = _arith(m.group("e"))
            if value is not None:
                found = [(m.start(), value)]
    return [float(val) for _, val in sorted(found, key=lambda t: t[0])]


def _fmt(x: float) -> str:
    return f"{x:g}"


def _score_equation(q: Question, answer: str) -> Score:
    values = solution_values(answer, q.variable)
    distinct: list[float] = []
    for x in values:
        if not any(abs(x - y) <= q.tolerance for y in distinct):
            distinct.append(x)
    if not distinct:
        return Score(0.0, "equation", [], False)
    shown = [f"{q.variable} = {_fmt(x)}" for x in distinct]
    if len(distinct) > 1:
        return Score(0.0, "equation", ["several values: " + ", ".join(shown)], False)
    ok = q.value is not None and abs(distinct[0] - q.value) <= q.tolerance
    return Score(1.0 if ok else 0.0, "equation", shown, ok)


# ---------------------------------------------------------------- code


def _score_code(q: Question, answer: str) -> Score:
    from pipeline_lib.sandbox import extract_code, pick_function, run_tests

    if not q.tests:
        return Score(None, "none", ["no test cases"], None)
    source, why = extract_code(answer)
    if source is None:
        return Score(0.0, "code", [f"0/{len(q.tests)} tests passed", why or "no code"], False)
    n_args = len(q.tests[0].args)
    fn = pick_function(source, n_args, q.function_hints)
    if fn is None:
        return Score(
            0.0, "code", [f"0/{len(q.tests)} tests passed", f"no function of {n_args} arguments"], False
        )
    try:
        res = run_tests(source, fn, [(t.args, t.expected) for t in q.tests], timeout_s=q.timeout_s)
    except OSError as err:  # no sandbox here: say so rather than score the answer 0
        return Score(None, "none", [f"not run: {err}"], None)
    matched = [f"{res.passed}/{res.total} tests passed", f"function {fn}"]
    if res.error and res.passed < res.total:
        matched.append(res.error)
    return Score(res.passed / res.total, "code", matched, res.passed == res.total)


# ---------------------------------------------------------------- list


def _score_list(q: Question, answer: str) -> Score:
    clauses = _clauses(normalize(answer))
    found = [
        item.name
        for item in q.items
        if any(not neg for _f, _c, neg in _find(item.forms, clauses, plural=True))
    ]
    required = q.required or len(q.items)
    return Score(min(len(found), required) / required, "list", found, len(found) >= required)


# ---------------------------------------------------------------- open (rubric)

_DONT_KNOW = re.compile(
    r"\b(?:i\s+(?:really\s+)?(?:do not|don't|dont)\s+know|i\s+(?:have|got)\s+no\s+(?:idea|clue)|no idea|no clue"
    r"|i(?:'m| am)\s+not\s+sure|i\s+(?:cannot|can't|can not|am unable to|'m unable to)\s+(?:say|answer|explain|tell)"
    r"|i\s+(?:have|hold)\s+no\s+(?:opinion|view))\b"
)
_BUT = re.compile(r"\b(?:but|however|though|although|yet)\b")


def says_dont_know(answer: str) -> bool:
    """The answer declares it does not know (and does not go on with "but ...")."""
    text = normalize(answer)
    return any(not _BUT.search(text[m.end() :]) for m in _DONT_KNOW.finditer(text))


def _score_rubric(q: Question, answer: str) -> Score:
    if says_dont_know(answer):
        return Score(0.0, "rubric", ["says it does not know"], None)
    clauses = _clauses(normalize(answer))
    found = [c.name for c in q.criteria if any(not neg for _f, _c, neg in _find(c.forms, clauses))]
    return Score(len(found) / len(q.criteria), "rubric", found, None)


# ---------------------------------------------------------------- API


def score_answer(question: Question, answer: str) -> Score:
    """Score one answer with the scorer for its question's kind."""
    answer = answer if isinstance(answer, str) else ""
    q = question
    if q.kind == "fact" and (q.answers or q.formulas):
        return _score_fact(q, answer)
    if q.kind == "equation" and q.value is not None:
        return _score_equation(q, answer)
    if q.kind == "code":
        return _score_code(q, answer)
    if q.kind == "list" and q.items:
        return _score_list(q, answer)
    if q.kind == "open" and q.criteria:
        return _score_rubric(q, answer)
    return Score(None, "none", [], None)


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def summarize(scores: Iterable[Score | Mapping[str, Any]]) -> dict[str, Any]:
    """question_score: mean of every score; correctness: mean over fact/equation/code/list; rubric_coverage:
    mean over open questions; and counts. Takes Scores or rows with "score" and "method"."""
    pairs = []
    for s in scores:
        if isinstance(s, Score):
            pairs.append((s.score, s.method, s.correct))
        else:
            pairs.append((s.get("score"), s.get("method", "none"), s.get("correct")))
    scored = [float(x) for x, _m, _c in pairs if x is not None]
    correctness = [float(x) for x, m, _c in pairs if x is not None and m in CORRECTNESS_METHODS]
    coverage = [float(x) for x, m, _c in pairs if x is not None and m == "rubric"]
    return {
        "question_score": _mean(scored),
        "correctness": _mean(correctness),
        "rubric_coverage": _mean(coverage),
        "n_answers": len(pairs),
        "n_scored": len(scored),
        "n_correctness": len(correctness),
        "n_correct": sum(1 for _x, m, c in pairs if m in CORRECTNESS_METHODS and c is True),
        "n_rubric": len(coverage),
        "n_unscored": len(pairs) - len(scored),
    }


def score_file(
    answers_path: str | Path, questions_path: str | Path | None = None, out_path: str | Path | None = None
) -> list[dict[str, Any]]:
    """Score a JSONL file of {"id": ..., "answer": ...} rows (other keys are kept); write the rows with
    score, method, matched, correct and meaning to `out_path` (JSONL) when given; return them."""
    path = Path(answers_path)
    if not path.is_file():
        raise ValueError(f"{path}: answers file not found")
    questions = {q.id: q for q in load_questions(questions_path)}
    rows: list[dict[str, Any]] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{n}: not JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{n}: expected an object with 'id' and 'answer'")
        missing = [k for k in ("id", "answer") if k not in row]
        if missing:
            raise ValueError(f"{path}:{n}: missing {' and '.join(repr(k) for k in missing)}")
        qid = row["id"]
        if isinstance(qid, str) and qid.strip().isdigit():
            qid = int(qid)
        if isinstance(qid, bool) or qid not in questions:
            raise ValueError(f"{path}:{n}: unknown question id {row['id']!r}")
        if not isinstance(row["answer"], str):
            raise ValueError(f"{path}:{n}: 'answer' must be a string")
        s = score_answer(questions[qid], row["answer"])
        rows.append(
            {
                **row,
                "score": s.score,
                "method": s.method,
                "matched": s.matched,
                "correct": s.correct,
                "meaning": s.meaning,
            }
        )
    if out_path is not None:
        out = Path(out_path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return rows
