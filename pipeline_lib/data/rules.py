"""The cleaning rules: each a small named function with its switch, the field it looks at and a description.

They cover the known defects of the original Alpaca set (docs: data notes): hallucination bait, merged
instructions, empty outputs, empty code answers, `<nooutput>` answers, `N/A` answers, placeholder inputs,
unclear instructions and stray control/escape characters; `clean` (prepare.py) adds exact and normalised
duplicates (`_norm`). They are deliberately narrow: a clean row, in any language, is never changed or dropped.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pipeline_lib.data.loading import FIELDS, Row

#
# Each rule is one small function. Repairs take a row and return a repaired copy, or None when nothing
# changed. Drops take a row and return True when it is to be dropped. All patterns are compiled once.

_CTRL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufeff\ud800-\udfff]")
_NEEDS_TEXT_REPAIR = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ufeff\ud800-\udfff\\]")
_CODE_LIKE = re.compile(r"[{};=<>]|\w\(|^\s*(?:def|class|import|return|print)\b|\n(?: {2,}|\t)\S", re.M)
# literal "\n" typed where a line break was meant: after sentence punctuation, before a new sentence/item
_ESC_INNER = re.compile(r"(?<=[.!?)\]\"'])(?:\\r)?\\n(?=(?:\\r)?\\n|[A-Z0-9\"'(*\u2022-])")
_ESC_START = re.compile(r"\A(?:\\[nrt])+(?=[A-Z0-9\"'(*\u2022-])")
_ESC_END = re.compile(r"(?<=[.!?)\]\"'])(?:\\[nrt])+\Z")
_ESC_QUOTE = re.compile(r"\\([\"'])")
_LEADING_BLANK_LINES = re.compile(r"\A(?:[ \t]*\n)+")


def _repair_text(s: str, keep_indent: bool) -> str:
    if not (s[:1].isspace() or s[-1:].isspace() or _NEEDS_TEXT_REPAIR.search(s)):
        return s
    if "\r" in s:
        s = s.replace("\r\n", "\n").replace("\r", "\n")
    s = _CTRL.sub("", s)
    if "\\" in s and not _CODE_LIKE.search(s):
        s = _ESC_START.sub("", s)
        s = _ESC_END.sub("", s)
        s = _ESC_INNER.sub("\n", s)
        s = _ESC_QUOTE.sub(r"\1", s)
    if keep_indent:  # an output may be code whose first line is indented: trim blank lines, not indentation
        s = _LEADING_BLANK_LINES.sub("", s.rstrip())
        return s if "\n" in s else s.lstrip()
    return s.strip()


def repair_control_chars(row: Row) -> Row | None:
    """Remove control characters (keeping newlines and tabs), stray literal escapes in prose ("\\n" after a
    sentence, \\" quotes) and surrounding whitespace; Windows line ends become \\n."""
    new = {
        "instruction": _repair_text(row["instruction"], False),
        "input": _repair_text(row["input"], False),
        "output": _repair_text(row["output"], True),
    }
    return None if new == row else new


_MERGED = re.compile(
    r"(?:\A|\s*\n)[ \t]*#{2,}[ \t]*(?:\n\s*(?:\d+\s*\.\s*)?(?:instruction|input|output)\s*:|\s*\Z)", re.I
)
_MERGED_NUMBERED = re.compile(
    r"\s*\n\s*(\d+)\s*\.\s*instruction\s*:.*?\n\s*\1\s*\.\s*output\s*:", re.I | re.S
)


def _cut_merged(s: str) -> str:
    if "#" not in s and "nstruction" not in s and "NSTRUCTION" not in s:
        return s
    m = _MERGED.search(s) or _MERGED_NUMBERED.search(s)
    return s[: m.start()].rstrip() if m else s


def repair_merged_instruction(row: Row) -> Row | None:
    """Cut a field that runs on into a following generated task ("\\n##\\n18. Instruction: ...")."""
    new = {k: _cut_merged(row[k]) for k in FIELDS}
    return None if new == row else new


_EMPTY_INPUT = re.compile(
    r"[<\[(]\s*(?:no[\s_-]*input|none|null|nil|empty|blank|n\s*/\s*a)\s*[>\])]\.?"
    r"|no[\s_-]*input(?:\s+(?:is\s+)?(?:required|needed|necessary|provided|given))?\.?"
    r"|n\s*/\s*a\.?",
    re.I,
)


def repair_empty_input(row: Row) -> Row | None:
    """Turn placeholder inputs ('<noinput>', '<no input>', 'No input', 'N/A', '<none>', ...) into ''."""
    inp = row["input"]
    if inp and len(inp) < 40 and _EMPTY_INPUT.fullmatch(inp.strip()):
        return {**row, "input": ""}
    return None


def drop_empty_output(row: Row) -> bool:
    """The output is empty or only whitespace."""
    return not row["output"].strip()


_NOOUTPUT = re.compile(r"[<\[(]\s*no[\s_-]*(?:output|input|answer|response)\s*[>\])]\.?", re.I)
_CANNOT_GPT = re.compile(
    r"(?:this|the)\s+(?:type\s+of\s+)?(?:instruction|task|request|question)\s+(?:cannot|can\s*not|can't)\s+be\s+"
    r"(?:fulfilled|completed|performed|carried\s+out|done|answered|accomplished)\s+(?:by|with)\s+(?:a|an|the)\s+"
    r"(?:gpt|language|ai)\b",
    re.I,
)
_CANNOT_MEDIA = re.compile(
    r"as\s+an\s+ai\b[^.\n]{0,60}?\b(?:cannot|can\s*not|can't|am\s+not\s+able\s+to|am\s+unable\s+to|"
    r"do\s+not\s+have\s+the\s+ability\s+to|don't\s+have\s+the\s+ability\s+to)\s+(?:\w+\s+){0,2}?"
    r"(?:generate|create|draw|produce|make|display|show|design|paint|render|compose)\s+(?:[\w-]+\s+){0,3}?"
    r"(?:images?|pictures?|photos?|photographs?|drawings?|paintings?|graphics?|logos?|visuals?|videos?|audio|"
    r"music|sounds?|songs?|diagrams?|charts?|sketch(?:es)?|illustrations?)\b",
    re.I,
)


def drop_nooutput(row: Row) -> bool:
    """The output is a '<nooutput>' / '<No Output>' placeholder, or a stock refusal to make images/media
    ('This instruction cannot be fulfilled by a GPT model', 'As an AI I cannot create images')."""
    out = row["output"].strip()
    if len(out) < 30:
        return bool(_NOOUTPUT.fullmatch(out))
    head = out[:200]
    return bool(_CANNOT_GPT.match(head) or _CANNOT_MEDIA.match(head))


_NA = re.compile(r"[<\[(]?\s*n\s*/\s*a\s*[>\])]?\.?", re.I)
_NA_TOPIC = re.compile(r"\bn\s*/\s*a\b|abbreviat|acronym|not\s+applicable|not\s+available", re.I)


def drop_na_output(row: Row) -> bool:
    """The output is just 'N/A' (unless the instruction asks about that abbreviation)."""
    out = row["output"].strip()
    return len(out) < 12 and bool(_NA.fullmatch(out)) and not _NA_TOPIC.search(row["instruction"])


_LETTER = re.compile(r"[^\W\d_]")
_PLACEHOLDER_ONLY = re.compile(
    r"[<\[(][^<>\[\]()\n]{0,40}[>\])]\.?|n\s*/\s*a\.?|(?:https?://|www\.)\S+", re.I
)


def drop_unclear_instruction(row: Row) -> bool:
    """The instruction has fewer than two letters (in any script), or is only a placeholder or a URL."""
    ins = row["instruction"].strip()
    m = _LETTER.search(ins)
    if m is None or _LETTER.search(ins, m.end()) is None:
        return True
    return len(ins) < 120 and bool(_PLACEHOLDER_ONLY.fullmatch(ins))


_REF_NOUN = (
    r"(?:sentences?|texts?|paragraphs?|passages?|articles?|statements?|phrases?|words?|lists?|data|dataset|"
    r"code|snippets?|poems?|story|stories|emails?|letters?|questions?|equations?|expressions?|tables?|"
    r"documents?|inputs?|essays?|tweets?|reviews?|excerpts?|quotes?|songs?|lyrics|recipes?|programs?|"
    r"functions?|numbers?|items?|strings?|conversations?|dialogues?|headlines?|titles?|descriptions?|"
    r"summar(?:y|ies)|reports?|messages?|speech|images?|pictures?|photos?|graphs?|charts?)"
)
_MISSING_INPUT = re.compile(
    r"\bthe\s+(?:following|given|provided|attached)"
    r"(?!\s+(?:names?|days?|weeks?|months?|years?|mornings?|nights?|evenings?|seasons?|times?|weekends?|"
    r"decades?|centur(?:y|ies))\b)(?:\s+[\w'-]+){0,3}\s*[.:?!]?\s*\Z"
    r"|\b(?:this|these)\s+(?:[\w'-]+\s+){0,2}?"
    + _REF_NOUN
    + r"(?:\s+(?:below|above))?(?:\s+(?:into|in|to|as|from|using|for|with)(?:\s+[\w'-]+){1,2})?\s*[.:?!]?\s*\Z",
    re.I,
)


def drop_missing_input(row: Row) -> bool:
    """The instruction ends by pointing at content ('... the following sentence.', '... this text.') but the
    input is empty, so the output can only be made up."""
    if row["input"].strip():
        return False
    return bool(_MISSING_INPUT.search(row["instruction"].strip()[-120:]))


_MEDIA = (
    r"(?:pictures?|images?|photos?|photographs?|pics?|graphs?|charts?|diagrams?|videos?|audio|recordings?|"
    r"links?|urls?|attachments?|files?|screenshots?|drawings?|paintings?|maps?|documents?|pdfs?|articles?|"
    r"websites?|web\s*pages?|gifs?)"
)
_MEDIA_LEAD = r"(?:insert|attached|attach|upload(?:ed)?|an?|the|see|link\s+to|url\s+(?:of|to)|paste)"
_MEDIA_TAIL = r"(?:attached|here|provided|below|link|url)"
_PLACEHOLDER_INPUT = re.compile(
    r"[<\[(]\s*(?:"
    + _MEDIA_LEAD
    + r"\s+)*"
    + _MEDIA
    + r"(?:\s+(?:"
    + _MEDIA_TAIL
    + r"|of\b[^<>\[\]()\n]{0,60}))?"
    r"\s*[>\])]\.?",
    re.I,
)
_PLACEHOLDER_IN_TEXT = re.compile(
    r"<\s*(?:"
    + _MEDIA_LEAD
    + r"\s+)+"
    + _MEDIA
    + r"[^<>\n]{0,40}>|<\s*"
    + _MEDIA
    + r"\s+"
    + _MEDIA_TAIL
    + r"\s*>",
    re.I,
)
_URL_ONLY = re.compile(r"(?:https?://|www\.)\S+", re.I)
_URL_WORD = (
    r"(?:urls?|links?|hyperlinks?|uris?|web\s*address(?:es)?|website\s+address(?:es)?|(?:sub)?domains?)"
)
_URL_PART = (
    r"(?:(?:sub)?domains?(?:\s+names?)?|host\s*names?|hosts?|paths?|(?:query|search)(?:\s+(?:strings?|"
    r"parameters?|params?))?|(?:url\s+)?parameters?|params?|protocols?|schemes?|ports?(?:\s+numbers?)?|"
    r"fragments?|anchors?|tlds?|top[\s-]+level\s+domains?|file\s*(?:names?|extensions?)|extensions?|slugs?|"
    r"(?:base|root)\s+urls?|origins?)"
)
_URL_ASPECT = (
    r"(?:format|structure|syntax|anatomy|components?|parts?|segments?|length|characters?|type|kind|"
    r"scheme|protocol|domain|path|query|encoding)"
)
# The task is about the URL string itself: take it apart, check, shorten, encode, classify or format it.
_URL_STRING_TASK = re.compile(
    r"\b(?:extract|parse|get|find|identify|return|output|list|print|show|give|tell|name|split|separate|isolate|"
    r"pull|strip|remove|replace|change|what(?:'s)?|which)\b[^.?!\n]{0,50}?\b" + _URL_PART + r"\b"
    r"|\bvalidate\b|\b(?:verify|check|test|determine|tell|is|are)\b[^.?!\n]{0,40}?\b(?:valid|invalid|"
    r"well[\s-]*formed|malformed|(?:correctly|properly)\s+formatted)\b"
    r"|\b(?:shorten|short\s+(?:url|link)|encode|decode|url[\s-]*encode|percent[\s-]*encode|escape|unescape|"
    r"normali[sz]e|canonicali[sz]e|sanitize|obfuscate|convert|reformat|format|hash|reverse|lowercase|uppercase|"
    r"classify|categori[sz]e|sort|group|label|break|split|dissect|decompose|tokeni[sz]e)\b[^.?!\n]{0,40}?\b"
    + _URL_WORD
    + r"\b"
    r"|\b"
    + _URL_ASPECT
    + r"\s+of\s+(?:(?:the|this|that|a|an|given|following|provided)\s+)*"
    + _URL_WORD
    + r"|\b"
    + _URL_WORD
    + r"(?:['\u2019]s)?\s+"
    + _URL_ASPECT
    + r"\b"
    r"|\b(?:html|markdown|anchor|clickable|hyper)[\s-]*(?:links?|tags?|elements?)\b|<a\b|\bqr\s+codes?\b"
    r"|\bregular\s+expressions?\b|\bregex",
    re.I,
)
_CONTENT_VERB = (
    r"(?:summari[sz]e|summary|summari[sz]ation|tl;?dr|describe|description|explain|review|critique|analy[sz]e|"
    r"analysis|evaluate|assess|rate|read|watch|listen\s+to|translate|paraphrase|rewrite|comment\s+on|"
    r"respond\s+to|reply\s+to|discuss|fact[\s-]*check|proofread|outline|recap|overview|synopsis|gist|"
    r"takeaways?|key\s+(?:points|ideas|facts)|main\s+(?:points?|ideas?|arguments?|message|topic|theme|claims?))"
)
_CONTENT_NOUN = (
    r"(?:articles?|(?:web\s*)?pages?|webpages?|posts?|blogs?|videos?|stor(?:y|ies)|papers?|contents?|podcasts?|"
    r"episodes?|news|documents?|reports?|essays?|books?|recipes?|tweets?|threads?|products?|movies?|films?|"
    r"songs?|images?|pictures?|photos?|websites?|sites?|text|lyrics|transcripts?|comments?|studies|study)"
    r"(?!['\u2019]s\s+" + _URL_WORD + r"|\s+(?:address|" + _URL_WORD + r"))"
)
_LINK_OBJECT = (
    r"(?:(?:the|this|that|given|following|provided|attached)\s+)?(?:links?|urls?|hyperlinks?|web\s*address)\b"
    r"(?!['\u2019]s|\s+" + _URL_ASPECT + r"\b)"
)
# The task is about what the link points at: read, summarise, describe, review... the page, article, video.
_URL_CONTENT_TASK = re.compile(
    r"\b" + _CONTENT_VERB + r"\b[^.?!\n]{0,60}?\b" + _CONTENT_NOUN + r"\b"
    r"|\b(?:summari[sz]e|review|critique|read|watch|listen\s+to|describe|explain|analy[sz]e|paraphrase|"
    r"fact[\s-]*check|discuss|comment\s+on|respond\s+to|open|visit|click)\s+(?:me\s+)?"
    + _LINK_OBJECT
    + r"|\b"
    + _CONTENT_NOUN
    + r"\s+(?:(?:at|behind|in|on|from|under|found\s+at|located\s+at)\s+(?:the|this|"
    r"that|given|following|provided)?\s*(?:links?|urls?|address|websites?|sites?)|linked\b)"
    r"|\bwhat\s+(?:is|does|do|are)\s+(?:the|this|that|these)\s+(?:links?|urls?|websites?|sites?|pages?|"
    r"articles?|videos?|posts?)\s+(?:about|say|says|discuss|show|contain|describe|mean)\b",
    re.I,
)


def _about_the_url_string(instruction: str) -> bool:
    """The task is about the URL text itself (parse it, take out its domain, path or query, validate, shorten,
    encode it, classify its format), not about the page, article or video it links to."""
    return bool(_URL_STRING_TASK.search(instruction)) and not _URL_CONTENT_TASK.search(instruction)


def drop_hallucination_bait(row: Row) -> bool:
    """The input is only a URL (and the task is not about the URL string itself, but, say, about the article
    behind it) or a media placeholder such as '<Picture Attached>' / '[Image]', or the instruction carries such
    a placeholder: the output can only be invented."""
    inp = row["input"].strip()
    if inp and len(inp) < 300:
        if _PLACEHOLDER_INPUT.fullmatch(inp):
            return True
        if _URL_ONLY.fullmatch(inp) and not _about_the_url_string(row["instruction"]):
            return True
    return bool(
        ("<" in row["instruction"] and _PLACEHOLDER_IN_TEXT.search(row["instruction"]))
        or ("<" in inp and _PLACEHOLDER_IN_TEXT.search(inp))
    )


_LANG = (
    r"(?<![\w+#])(?:python|javascript|java|typescript|c\+\+|c#|c|ruby|php|sql|html|css|bash|shell|powershell|"
    r"perl|rust|golang|go|swift|kotlin|scala|matlab|r|haskell|lua|julia|dart|vba|assembly)(?![\w+#])"
)
_CODE_NOUN = (
    r"(?:code|programs?|scripts?|functions?|methods?|class(?:es)?|quer(?:y|ies)|snippets?|statements?|loops?|"
    r"modules?|routines?|subroutines?|algorithms?|commands?|pages?|documents?|templates?|regex(?:es)?)\b"
)
_CODE_VERB = (
    r"\b(?:write|create|generate|implement|develop|compose|construct|build|code|program|fix|refactor|"
    r"complete|rewrite|modify|edit|convert|translate|optimi[sz]e|design|make)\b"
)
_CODE_REQUEST = re.compile(
    _CODE_VERB
    + r"[^.?!\n]{0,60}?(?:"
    + _LANG
    + r"\s+"
    + _CODE_NOUN
    + r"|\b"
    + _CODE_NOUN
    + r"\s+(?:in|using)\s+"
    + _LANG
    + r"|\b(?:pieces?|snippets?|blocks?|lines?)\s+of\s+code\b|\bcode\s+(?:snippets?|blocks?)\b|\bsource\s+code\b"
    + r"|\b(?:regex(?:es)?|regular\s+expressions?|subroutines?|sql\s+quer(?:y|ies))\b)"
    + r"|\b(?:write|implement)\s+(?:a\s+|an\s+|some\s+|the\s+)?(?:[\w-]+\s+)?(?:code|function)\b"
    r"(?!\s+(?:of|word|name|phrase)\b)",
    re.I,
)
# every _CODE_REQUEST match contains one of these: a cheap test first
_CODE_WORDS = (
    "code", "program", "script", "function", "method", "class", "quer", "snippet", "statement", "loop",
    "module", "routine", "algorithm", "command", "page", "document", "template", "regex", "regular",
)  # fmt: skip
_HAS_CODE = re.compile(
    r"[{}\[\];=<>`\\|$]|\w\(|^\s*(?:def|class|import|from|for|while|if|return|print|echo|puts|let|var|const|"
    r"function|public|private|static|SELECT|INSERT|UPDATE|DELETE|CREATE|ALTER|DROP|WITH)\b|^\s*#(?:include|!)"
    r"|\n(?: {2,}|\t)\S|(?i:\bselect\b[^\n]*\bfrom\b)",
    re.M,
)


def drop_empty_code(row: Row) -> bool:
    """The instruction asks for code (a Python function, an SQL query, a piece of code...) and the output
    contains nothing that looks like code."""
    ins = row["instruction"]
    low = ins.lower()
    if not any(w in low for w in _CODE_WORDS):
        return False
    return bool(_CODE_REQUEST.search(ins)) and not _HAS_CODE.search(row["output"])


Field = Literal["instruction", "input", "output"]


@dataclass(frozen=True)
class Rule:
    """One named cleaning rule: a repair (row -> repaired row or None) or a drop (row -> bool).

    `field` is the field the rule inspects: the one a drop is shown by in the audit. A repair that may change
    any field has `field=None`, and the audit shows the field it changed."""

    name: str
    action: Literal["repair", "drop"]
    flag: str  # the CleaningConfig switch
    fn: Callable[[Row], Any]
    field: Field | None
    description: str

    def __post_init__(self) -> None:
        if self.action == "drop" and self.field is None:
            raise ValueError(f"drop rule {self.name!r} must name the field it inspects")


RULES: tuple[Rule, ...] = (
    Rule("control_chars", "repair", "strip_control_chars", repair_control_chars, None,
         "remove control characters and stray escapes, trim whitespace"),
    Rule("merged_instruction", "repair", "cut_merged_instructions", repair_merged_instruction, None,
         "cut a field at a '##' marker followed by another numbered task"),
    Rule("empty_input", "repair", "normalize_empty_input", repair_empty_input, "input",
         "placeholder input ('<noinput>', 'No input', 'N/A') becomes ''"),
    Rule("empty_output", "drop", "drop_empty_output", drop_empty_output, "output", "output is empty"),
    Rule("nooutput", "drop", "drop_nooutput", drop_nooutput, "output",
         "output is '<nooutput>' or a stock refusal to make images"),
    Rule("na_output", "drop", "drop_na_output", drop_na_output, "output", "output is 'N/A'"),
    Rule("unclear_instruction", "drop", "drop_unclear_instruction", drop_unclear_instruction, "instruction",
         "instruction has no words, or is only a placeholder or URL"),
    Rule("missing_input", "drop", "drop_missing_input", drop_missing_input, "instruction",
         "instruction points at an input that is empty"),
    Rule("hallucination_bait", "drop", "drop_hallucination_bait", drop_hallucination_bait, "input",
         "input is only a URL or a media placeholder"),
    Rule("empty_code", "drop", "drop_empty_code", drop_empty_code, "output",
         "code was asked for, the output has none"),
)  # fmt: skip
INVALID_ROW = "invalid_row"
DUPLICATE = "duplicate"
NEAR_DUPLICATE = "near_duplicate"
SAMPLED_OUT = "max_rows"
_RULE_DESCRIPTIONS = {
    INVALID_ROW: "instruction/output missing or not text",
    DUPLICATE: "same instruction, input and output as an earlier row",
    NEAR_DUPLICATE: "same as an earlier row up to case, whitespace and punctuation",
    SAMPLED_OUT: "left out by the seeded max_rows sample",
    **{r.name: r.description for r in RULES},
}


def rule_names() -> list[str]:
    """Every rule name an audit can contain, in the order the rules run."""
    return [INVALID_ROW, *(r.name for r in RULES), DUPLICATE, NEAR_DUPLICATE, SAMPLED_OUT]


_NORM = re.compile(r"[\s.,;:!?'\"`()\[\]{}\u201c\u201d\u2018\u2019\u00ab\u00bb\u2026\u3002\uff0c]+")


def _norm(s: str) -> str:
    """Casefolded, with runs of whitespace and punctuation as one space: what near-duplicates share."""
    return _NORM.sub(" ", s.casefold()).strip()
