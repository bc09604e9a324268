"""Alpaca-format rows generated from a small, seeded world: the smoke data set, test fixtures, benchmark input.

The smoke world has two kinds of content:

- **facts** (capitals, authors, painters, chemical formulas), each asked in several phrasings, so a fact seen
  in training is asked again in other words; the smoke question set (`assets/smoke_question_set.md`) asks
  about these facts;
- **tasks whose answer follows from the input** (sums, equations, sorting, reversing, comparing, plurals,
  antonyms, sentiment, ...), with random arguments, so nearly every row is unique and the held-out split is a
  real held-out set: the same instruction and input never appears on both sides (`data.split` groups on it).

`pretraining_texts` is the plain text the tiny base models are pre-trained on (`pipeline_lib.tiny`): the same
facts, stated in other sentences than any instruction row uses and never in the instruction template, so a
base model "knows" the world but not the question-and-answer format, and no smoke row (held-out ones least
of all) is ever in its pre-training text. Deterministic for a given seed.

Over 500 lines because most of it is data: the world's fact tables and the hand-written clean, tricky and
defective rows that the tests hold every cleaning rule to.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CAPITALS = [
    ("Australia", "Canberra"),
    ("France", "Paris"),
    ("Japan", "Tokyo"),
    ("Canada", "Ottawa"),
    ("Brazil", "Brasilia"),
    ("Germany", "Berlin"),
    ("Egypt", "Cairo"),
    ("Norway", "Oslo"),
    ("Mexico", "Mexico City"),
    ("Turkey", "Ankara"),
    ("Ireland", "Dublin"),
    ("Vietnam", "Hanoi"),
]
BOOKS = [
    ("To Kill a Mockingbird", "Harper Lee"),
    ("1984", "George Orwell"),
    ("Pride and Prejudice", "Jane Austen"),
    ("War and Peace", "Leo Tolstoy"),
    ("Don Quixote", "Miguel de Cervantes"),
    ("Frankenstein", "Mary Shelley"),
]
PAINTINGS = [
    ("The Starry Night", "Vincent van Gogh"),
    ("Mona Lisa", "Leonardo da Vinci"),
    ("Guernica", "Pablo Picasso"),
    ("The Scream", "Edvard Munch"),
]
FORMULAS = [
    ("table salt", "NaCl"),
    ("water", "H2O"),
    ("carbon dioxide", "CO2"),
    ("methane", "CH4"),
    ("ammonia", "NH3"),
]
THREATS = ["phishing", "malware", "ransomware", "denial of service", "SQL injection", "spyware"]
ANTONYMS = {
    "hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "light": "dark", "early": "late",
    "open": "closed", "full": "empty", "strong": "weak", "high": "low", "old": "new", "wet": "dry",
}  # fmt: skip
PLURALS = {
    "cat": "cats", "house": "houses", "child": "children", "mouse": "mice", "box": "boxes", "city": "cities",
    "tooth": "teeth", "leaf": "leaves", "bus": "buses", "person": "people", "story": "stories", "foot": "feet",
}  # fmt: skip
WORDS = (
    "river garden planet window forest candle bridge island music letter mountain pencil ocean rocket "
    "station picture basket orange yellow silver market winter summer doctor teacher village engine"
).split()
GOOD = ["wonderful", "excellent", "delightful", "great", "lovely"]
BAD = ["terrible", "awful", "disappointing", "horrible", "dreadful"]
THINGS = ["movie", "meal", "hotel", "concert", "book", "service", "trip", "game"]
SUBJECTS = ["She", "He", "My brother", "The teacher", "Our neighbour", "The child"]
VERBS_PRESENT_PAST = [
    ("walks to school", "walked to school"),
    ("plays the piano", "played the piano"),
    ("cooks dinner", "cooked dinner"),
    ("paints the fence", "painted the fence"),
    ("cleans the kitchen", "cleaned the kitchen"),
    ("visits the museum", "visited the museum"),
]


def fact_rows() -> list[dict]:
    """Every fact of the world in every phrasing, once each (the fact part of the smoke data).

    An answer repeats the question's name in the same surroundings as the question (" Norway" after a
    space, a title inside quotes), so the name is the same tokens in both: a byte-level tokenizer splits
    "Norway" at the start of a line into other pieces than " Norway" after a space, and a tiny model cannot
    learn to carry a name across that change in a few minutes."""
    rows: list[tuple[str, str, str]] = []
    for country, capital in CAPITALS:
        rows += [
            (f"What is the capital city of {country}?", "", f"The capital city of {country} is {capital}."),
            (f"Which city is the capital of {country}?", "", f"The capital of {country} is {capital}."),
            (f"Tell me the capital of {country}.", "", f"The capital of {country} is {capital}."),
            ("Name the capital of the given country.", country, f"{capital}."),
        ]
    for book, author in BOOKS:
        rows += [
            (f'Who wrote the novel "{book}"?', "", f'"{book}" was written by {author}.'),
            (f'Who is the author of "{book}"?', "", f'The author of "{book}" is {author}.'),
            ("Name the author of the given book.", book, f"{author}."),
        ]
    for painting, painter in PAINTINGS:
        rows += [
            (f'Who painted the famous artwork "{painting}"?', "", f'"{painting}" was painted by {painter}.'),
            (f'Which artist painted "{painting}"?', "", f'"{painting}" was painted by {painter}.'),
        ]
    for thing, formula in FORMULAS:
        rows += [
            (
                f"What is the chemical formula for {thing}?",
                "",
                f"The chemical formula for {thing} is {formula}.",
            ),
            (f"Give the chemical formula of {thing}.", "", f"The chemical formula of {thing} is {formula}."),
        ]
    return [dict(zip(("instruction", "input", "output"), r, strict=True)) for r in rows]


def _task_rows(rng: random.Random) -> list[dict]:
    a, b = rng.randint(2, 60), rng.randint(2, 60)
    k, x, c = rng.randint(2, 9), rng.randint(1, 12), rng.randint(1, 20)
    nums = rng.sample(range(1, 100), rng.randint(3, 6))
    words = rng.sample(WORDS, rng.randint(3, 5))
    word = rng.choice(WORDS)
    n = rng.randint(2, 99)
    r = rng.randint(1, 10)
    adj = rng.choice(sorted(ANTONYMS))
    noun = rng.choice(sorted(PLURALS))
    good = rng.random() < 0.5
    review = f"The {rng.choice(THINGS)} was {rng.choice(GOOD if good else BAD)}."
    subject = rng.choice(SUBJECTS)
    present, past = rng.choice(VERBS_PRESENT_PAST)
    sentence = " ".join(rng.choices(WORDS, k=rng.randint(3, 9))).capitalize() + "."
    threats = rng.sample(THREATS, 3)
    fn = rng.choice(["add_vectors", "vector_sum", "sum_vectors", "add"])
    rows = [
        (f"What is {a} plus {b}?", "", f"{a} plus {b} is {a + b}."),
        ("Add the two numbers.", f"{a} and {b}", f"{a + b}"),
        (
            f"Solve the equation {k}x + {c} = {k * x + c}.",
            "",
            f"Subtract {c} from both sides to get {k}x = {k * x}, then divide by {k}: x = {x}.",
        ),
        ("Sort the numbers from smallest to largest.", ", ".join(map(str, nums)), ", ".join(map(str, sorted(nums)))),
        ("Reverse the order of the words.", " ".join(words), " ".join(reversed(words))),
        ("Write the word in capital letters.", word, word.upper()),
        (f"What is the first letter of the word '{word}'?", "", f"The first letter of '{word}' is '{word[0]}'."),
        ("How many words are in the sentence?", sentence, f"There are {len(sentence.split())} words."),
        (f"Which number is larger, {a} or {b}?", "", f"{max(a, b)} is larger." if a != b else "They are equal."),
        (f"Is {n} even or odd?", "", f"{n} is {'even' if n % 2 == 0 else 'odd'}."),
        (f"What is the plural of '{noun}'?", "", f"The plural of '{noun}' is '{PLURALS[noun]}'."),
        (f"Give the opposite of the word '{adj}'.", "", ANTONYMS[adj]),
        ("Classify the sentiment of the review as positive or negative.", review, "positive" if good else "negative"),
        ("Rewrite the sentence in the past tense.", f"{subject} {present} every day.", f"{subject} {past} every day."),
        (
            "Calculate the area of a circle with the given radius.",
            f"radius = {r}",
            f"The area is pi * r ** 2 = 3.14159 * {r * r} = {3.14159 * r * r:.2f}.",
        ),
        ("Name three common cybersecurity threats.", "", f"Three common threats are {threats[0]}, {threats[1]} and {threats[2]}."),
        (
            f"Write a Python function named {fn} that sums two vectors.",
            "",
            f"def {fn}(a, b):\n    return [x + y for x, y in zip(a, b)]",
        ),
    ]  # fmt: skip
    return [dict(zip(("instruction", "input", "output"), row, strict=True)) for row in rows]


FACT_SHARE = 0.2  # share of fact rows in `alpaca_rows`, up to every fact once


def alpaca_rows(n: int, seed: int = 0) -> list[dict]:
    """`n` clean Alpaca-format rows of the smoke world, deterministic for `seed`: about `FACT_SHARE` fact
    rows (distinct, at most every fact in every phrasing once) and task rows with random arguments, shuffled."""
    rng = random.Random(seed)
    facts = fact_rows()
    rng.shuffle(facts)
    out = facts[: min(len(facts), round(n * FACT_SHARE))]
    while len(out) < n:
        out.extend(rng.sample(_task_rows(rng), 4))
    out = out[:n]
    rng.shuffle(out)
    return out


def pretraining_texts(n: int, seed: int = 0) -> list[str]:
    """`n` short plain-text passages about the smoke world, for pre-training the tiny base models: its facts
    in sentences that no instruction row uses, simple arithmetic and word facts, and no instruction template."""
    rng = random.Random(seed)
    statements: list[str] = []
    # Each fact in two sentences, and once as a plain-text question and answer, as a web page of questions has
    # them (never the instruction template, never a question any smoke row asks): that is what teaches a base
    # model to carry a name from a question into its answer.
    for country, capital in CAPITALS:
        statements += [
            f"{capital} is the capital city of {country}.",
            f"The capital of {country} is {capital}.",
            f"Q: Where does the government of {country} sit? A: The capital of {country} is {capital}.",
        ]
    for book, author in BOOKS:
        statements += [
            f'{author} is known for the book "{book}".',
            f'"{book}" was written by {author}.',
            f'Q: Who is behind the book "{book}"? A: "{book}" was written by {author}.',
        ]
    for painting, painter in PAINTINGS:
        statements += [
            f'{painter} made the painting "{painting}".',
            f'"{painting}" was painted by {painter}.',
            f'Q: Who made "{painting}"? A: "{painting}" was painted by {painter}.',
        ]
    for thing, formula in FORMULAS:
        statements += [
            f"Chemists write {thing} as {formula}.",
            f"The chemical formula for {thing} is {formula}.",
            f"Q: How do chemists write {thing}? A: The chemical formula for {thing} is {formula}.",
        ]
    for word, opposite in ANTONYMS.items():
        statements.append(f"Something {word} is the opposite of something {opposite}.")
    for one, many in PLURALS.items():
        statements.append(f"One {one}, two {many}.")
    out: list[str] = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.6:
            out.append(" ".join(rng.sample(statements, rng.randint(2, 4))))
        elif kind < 0.8:
            a, b = rng.randint(2, 60), rng.randint(2, 60)
            out.append(f"{a} and {b} together make {a + b}. Take {b} away again and {a} is left.")
        else:
            words = rng.sample(WORDS, rng.randint(4, 8))
            out.append(" ".join(words).capitalize() + ". " + ", ".join(sorted(words)) + ".")
    return out


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


if __name__ == "__main__":  # regenerate the shipped smoke data: python -m pipeline_lib.synthetic
    here = Path(__file__).parent / "assets" / "smoke_alpaca.jsonl"
    write_jsonl(alpaca_rows(900, seed=7), here)
    print(here)


# --------------------------------------------------------------------------------------------------------
# Rows for the data tests and the data benchmark: clean rows in other languages and scripts, rows with each
# known defect of the original Alpaca set, and large Alpaca-sized sets with a share of defects mixed in.

NON_ENGLISH_ROWS: list[dict] = [
    {
        "instruction": "把下面的句子翻译成英文。",
        "input": "我喜欢学习新的语言。",
        "output": "I like learning new languages.",
    },
    {"instruction": "Какая столица России?", "input": "", "output": "Столица России — Москва."},
    {"instruction": "भारत की राजधानी क्या है?", "input": "", "output": "भारत की राजधानी नई दिल्ली है।"},
    {"instruction": "ما هي عاصمة مصر؟", "input": "", "output": "عاصمة مصر هي القاهرة."},
    {
        "instruction": "پایتخت ایران کجاست؟",
        "input": "",
        "output": "پایتخت ایران تهران است. من می\u200cخواهم به تهران بروم.",
    },
    {"instruction": "日本の首都はどこですか？", "input": "", "output": "日本の首都は東京です。"},
    {"instruction": "¿Cuál es la capital de Perú?", "input": "", "output": "¡La capital de Perú es Lima!"},
    {"instruction": "Nenne ein Wort mit ß.", "input": "", "output": "Straße"},
    {"instruction": "Describe your mood with emoji only.", "input": "", "output": "😀🎉👍"},
    {"instruction": "Show a family with one emoji.", "input": "", "output": "👨\u200d👩\u200d👧"},
]

# Clean rows that look a little like defects; no cleaning rule may touch them.
TRICKY_CLEAN_ROWS: list[dict] = [
    {
        "instruction": "Write a Python function that prints each item of a list.",
        "input": "",
        "output": "def show(items):\n\tfor item in items:\n\t\tprint(item)",
    },
    {
        "instruction": "Write a Python statement that prints two lines.",
        "input": "",
        "output": 'print("first\\nsecond")',
    },
    {
        "instruction": "What is the escape sequence for a new line in Python?",
        "input": "",
        "output": "The escape sequence is \\n.",
    },
    {"instruction": "Write the common abbreviation for 'not applicable'.", "input": "", "output": "N/A"},
    {
        "instruction": "Extract the domain name from the URL.",
        "input": "https://www.example.com/about",
        "output": "example.com",
    },
    # a URL-only input is fine when the task is about the URL string itself (hallucination_bait keeps these)
    {
        "instruction": "Parse the URL and list its query parameters.",
        "input": "https://example.com/search?q=cats&page=2",
        "output": "q = cats\npage = 2",
    },
    {
        "instruction": "Is this URL valid?",
        "input": "http://example..com/index.html",
        "output": "No. The host name has an empty label between the two dots.",
    },
    {
        "instruction": "Encode the URL so that it can be used as a query parameter.",
        "input": "https://example.com/a?x=1&y=2",
        "output": "https%3A%2F%2Fexample.com%2Fa%3Fx%3D1%26y%3D2",
    },
    {
        "instruction": "Classify the URL format as absolute or relative.",
        "input": "https://example.com/docs/intro",
        "output": "Absolute.",
    },
    {
        "instruction": "Shorten the URL by removing its tracking parameters.",
        "input": "https://shop.example.com/item/42?utm_source=mail&utm_medium=email",
        "output": "https://shop.example.com/item/42",
    },
    {
        "instruction": "What protocol does this URL use?",
        "input": "https://www.example.org/login",
        "output": "HTTPS.",
    },
    {
        "instruction": "Rewrite the following sentence in the passive voice: The cat chased the mouse.",
        "input": "",
        "output": "The mouse was chased by the cat.",
    },
    {
        "instruction": "Write a function that describes a line with slope 2 through the origin.",
        "input": "",
        "output": "f(x) = 2x",
    },
    {
        "instruction": "Write a script for a short play about two friends.",
        "input": "",
        "output": "Anna: You came!\nBen: I always keep my promises.",
    },
    {
        "instruction": "Generate a code of conduct for a book club.",
        "input": "",
        "output": "Be kind, read the book, and let everyone speak.",
    },
    {
        "instruction": "Write a short markdown document with a heading and a list.",
        "input": "",
        "output": "## Shopping\n\n- milk\n- eggs",
    },
    {"instruction": "What is the Python type of the given value?", "input": "None", "output": "NoneType"},
    {"instruction": "What is the chemical symbol for sodium?", "input": "", "output": "Na"},
    {"instruction": "What does this HTML tag create?", "input": "<input>", "output": "A form field."},
    {
        "instruction": "Create a SQL query that lists all customers from Canada.",
        "input": "",
        "output": "select * from customers where country = 'Canada';",
    },
    {
        "instruction": "Indent the code block.",
        "input": "x = 1\ny = 2",
        "output": "    x = 1\n    y = 2",
    },
    {"instruction": "What happened the following day?", "input": "", "output": "The treaty was signed."},
    {"instruction": "What is the given name of Albert Einstein?", "input": "", "output": "Albert"},
]


def _defect(rule: str, action: str, row: dict, expected: dict | None = None) -> dict:
    return {**row, "rule": rule, "action": action, "expected": expected}


def defective_rows() -> list[dict]:
    """Rows with each known defect of the original Alpaca set (data notes, classes 1-7, 9, 10) and duplicates.

    Each row has the Alpaca fields plus `rule` (the cleaning rule that must catch it), `action` ("drop" or
    "repair") and `expected` (for repairs: the repaired row). Duplicate rows copy rows of `alpaca_rows(14)`,
    so put those first when testing them."""
    base = alpaca_rows(14, seed=3)
    out = [
        # 1. hallucination bait
        _defect("hallucination_bait", "drop", {"instruction": "Summarize the article.",
                "input": "https://www.example.com/news/2023/ai-article", "output": "The article says AI is great."}),
        # ... also when the instruction names the link: the task is about the content behind it
        _defect("hallucination_bait", "drop", {"instruction": "Summarize the article at the link.",
                "input": "https://news.example.org/2023/05/ai-regulation",
                "output": "The article says new rules for AI were passed."}),
        _defect("hallucination_bait", "drop", {"instruction": "Describe the web page at this link.",
                "input": "www.example.com/products/blender", "output": "It is a product page for a blender."}),
        _defect("hallucination_bait", "drop", {"instruction": "Explain what the video at the link is about.",
                "input": "https://video.example.com/watch?v=abc123", "output": "The video explains how volcanoes form."}),
        _defect("hallucination_bait", "drop", {"instruction": "Write a review of the product at this URL.",
                "input": "https://shop.example.com/item/4411", "output": "Great product, five stars."}),
        _defect("hallucination_bait", "drop", {"instruction": "Classify the website at this link by its topic.",
                "input": "https://www.example.net/", "output": "Technology news."}),
        _defect("hallucination_bait", "drop", {"instruction": "Describe the picture.", "input": "<Picture Attached>",
                "output": "The picture shows a sunset over the sea."}),
        _defect("hallucination_bait", "drop", {"instruction": "Classify the mood of the painting.", "input": "[Image]",
                "output": "Calm."}),
        _defect("hallucination_bait", "drop", {"instruction": "What is shown here? <image attached>", "input": "",
                "output": "A dog playing in the park."}),
        # 2. merged instructions
        _defect("merged_instruction", "repair", {"instruction": "What is the capital of France?", "input": "",
                "output": "Paris is the capital of France.\n##\n18. Instruction: Name a famous painter.\n"
                "18. Input:\n<noinput>\n18. Output:\nPablo Picasso."},
                {"instruction": "What is the capital of France?", "input": "",
                 "output": "Paris is the capital of France."}),
        _defect("merged_instruction", "repair", {"instruction": "Give an antonym of 'hot'.", "input": "",
                "output": "cold\n\n7. Instruction: Give an antonym of 'big'.\n7. Input:\n\n7. Output:\nsmall"},
                {"instruction": "Give an antonym of 'hot'.", "input": "", "output": "cold"}),
        # 3. empty outputs
        _defect("empty_output", "drop", {"instruction": "Name a type of cloud.", "input": "", "output": ""}),
        _defect("empty_output", "drop", {"instruction": "Name a type of tree.", "input": "", "output": "  \n "}),
        # 4. empty code examples
        _defect("empty_code", "drop", {"instruction": "Write a Python function that reverses a string.", "input": "",
                "output": "The function takes a string and returns it reversed."}),
        _defect("empty_code", "drop", {"instruction": "Write a SQL query to count the orders.",
                "input": "", "output": "This query counts every order in the table."}),
        # 5. image requests answered with <nooutput>
        _defect("nooutput", "drop", {"instruction": "Generate an image of a cat wearing a hat.", "input": "",
                "output": "<nooutput>"}),
        _defect("nooutput", "drop", {"instruction": "Draw a logo for a coffee shop.", "input": "",
                "output": "<No Output>"}),
        _defect("nooutput", "drop", {"instruction": "Paint a picture of a stormy sea.", "input": "",
                "output": "This type of instruction cannot be fulfilled by a GPT model."}),
        # 6. N/A outputs
        _defect("na_output", "drop", {"instruction": "Name the tallest mountain on Mars.", "input": "",
                "output": "N/A"}),
        _defect("na_output", "drop", {"instruction": "Who wrote the song?", "input": "Yesterday", "output": "n/a."}),
        # 7. inconsistent empty input
        *[
            _defect("empty_input", "repair", {"instruction": "Name three primary colors.", "input": placeholder,
                    "output": f"Red, yellow and blue ({i})."},
                    {"instruction": "Name three primary colors.", "input": "", "output": f"Red, yellow and blue ({i})."})
            for i, placeholder in enumerate(["<noinput>", "<no input>", "No input", "N/A", "No input required."])
        ],
        # 9. unclear instructions
        _defect("unclear_instruction", "drop", {"instruction": "???", "input": "", "output": "I am not sure."}),
        _defect("unclear_instruction", "drop", {"instruction": "<instruction>", "input": "", "output": "Okay."}),
        _defect("missing_input", "drop", {"instruction": "Summarize the following text.", "input": "",
                "output": "The text is about a trip to the sea."}),
        _defect("missing_input", "drop", {"instruction": "Translate this sentence into French.", "input": "<noinput>",
                "output": "Je suis content."}),
        # 10. control and escape characters
        _defect("control_chars", "repair", {"instruction": "\ufeffName a primary color.  ", "input": "",
                "output": "Red.\x00\x1b"}, {"instruction": "Name a primary color.", "input": "", "output": "Red."}),
        _defect("control_chars", "repair", {"instruction": "Give two steps for baking bread.", "input": "",
                "output": "First, mix the dough.\\nThen, bake it for 30 minutes.\\n"},
                {"instruction": "Give two steps for baking bread.", "input": "",
                 "output": "First, mix the dough.\nThen, bake it for 30 minutes."}),
        _defect("control_chars", "repair", {"instruction": "Quote a greeting.", "input": "",
                "output": 'He said \\"hello\\" to me.\r\nThen he left.'},
                {"instruction": "Quote a greeting.", "input": "", "output": 'He said "hello" to me.\nThen he left.'}),
        # duplicates of the clean rows `base`
        _defect("duplicate", "drop", dict(base[0])),
        _defect("near_duplicate", "drop", {k: v.upper() + " " for k, v in base[1].items()}),
        _defect("near_duplicate", "drop", {**base[2], "output": base[2]["output"].rstrip(".!") + " ! "}),
        # not usable as a row at all
        _defect("invalid_row", "drop", {"instruction": 5, "input": "", "output": "five"}),
        _defect("invalid_row", "drop", {"instruction": "Say hi.", "input": ["a"], "output": "hi"}),
        _defect("invalid_row", "drop", {"input": "", "output": "an answer without a question"}),
    ]  # fmt: skip
    return out


_WORDS = (
    "time year people way day man thing woman life child world school state family student group country "
    "problem hand part place case week company system program question work government number night point "
    "home water room mother area money story fact month lot right study book eye job word business issue "
    "side kind head house service friend father power hour game line end member law car city community name "
    "president team minute idea kid body information back parent face others level office door health person "
    "art war history party result change morning reason research girl guy moment air teacher force education "
    "energy market plant river garden music science ocean forest island mountain planet machine network data "
    "model language computer engine bridge island recipe travel weather climate economy culture festival"
).split()
_VERBS = "explain describe summarize compare list outline discuss analyze evaluate define".split()
_OTHER_SCRIPTS = [
    "学习新的语言很有趣。",
    "Москва — большой город.",
    "नई दिल्ली भारत की राजधानी है।",
    "東京は大きいです。",
]


def _sentence(rng: random.Random, lo: int = 6, hi: int = 18) -> str:
    words = rng.choices(_WORDS, k=rng.randint(lo, hi))
    return " ".join(words).capitalize() + rng.choice(".....!?")


def _text(rng: random.Random, chars: int) -> str:
    parts: list[str] = []
    n = 0
    while n < chars:
        s = _sentence(rng)
        parts.append(s)
        n += len(s) + 1
    return " ".join(parts)


def _sized_row(rng: random.Random, i: int) -> dict:
    out_chars = min(4800, int(rng.lognormvariate(4.85, 0.9)))  # median ~130 chars, p99 ~1,050, capped
    kind = rng.random()
    if kind < 0.05:
        fn = f"{rng.choice(_VERBS)}_{rng.choice(_WORDS)}_{i}"
        body = "\n".join(
            f"    {rng.choice(_WORDS)}_{j} = {rng.choice(_WORDS)}({j})"
            for j in range(max(1, out_chars // 40))
        )
        return {
            "instruction": f"Write a Python function named {fn} that processes a {rng.choice(_WORDS)}.",
            "input": "",
            "output": f"def {fn}(x):\n{body}\n    return x",
        }
    if kind < 0.07:
        return {
            "instruction": f"Translate the sentence into English ({i}).",
            "input": rng.choice(_OTHER_SCRIPTS) + " " + _sentence(rng, 3, 6),
            "output": _text(rng, out_chars),
        }
    topic = " ".join(rng.choices(_WORDS, k=rng.randint(2, 5)))
    if kind < 0.45:
        return {
            "instruction": f"{rng.choice(_VERBS).capitalize()} the main point of the text about {topic}.",
            "input": _text(rng, int(rng.lognormvariate(4.3, 0.7))),
            "output": _text(rng, out_chars),
        }
    return {
        "instruction": f"{rng.choice(_VERBS).capitalize()} the {topic} in a few sentences ({i}).",
        "input": "",
        "output": _text(rng, out_chars),
    }


def _inject(rng: random.Random, row: dict, kind: str, earlier: list[dict], i: int) -> dict:
    if kind == "hallucination_bait":
        return {**row, "instruction": "Summarize the article.", "input": f"https://example.com/news/{i}"}
    if kind == "merged_instruction":
        return {**row, "output": row["output"] + f"\n##\n{i % 20 + 1}. Instruction: {_sentence(rng)}\n"
                f"{i % 20 + 1}. Input:\n<noinput>\n{i % 20 + 1}. Output:\n{_sentence(rng)}"}  # fmt: skip
    if kind == "empty_output":
        return {**row, "output": ""}
    if kind == "empty_code":
        return {"instruction": f"Write a Python function that sorts the {rng.choice(_WORDS)} list ({i}).",
                "input": "", "output": "The function sorts the list and returns it."}  # fmt: skip
    if kind == "nooutput":
        return {"instruction": f"Generate an image of a {rng.choice(_WORDS)} ({i}).", "input": "",
                "output": "<nooutput>"}  # fmt: skip
    if kind == "na_output":
        return {**row, "output": "N/A"}
    if kind == "empty_input":
        return {**row, "input": rng.choice(["<noinput>", "No input", "<no input>"])}
    if kind == "unclear_instruction":
        return {**row, "instruction": "?" * rng.randint(1, 4)}
    if kind == "missing_input":
        return {**row, "instruction": "Summarize the following text.", "input": ""}
    if kind == "control_chars":
        return {**row, "output": row["output"] + "\x00\x1b"}
    if kind == "duplicate" and earlier:
        return dict(rng.choice(earlier))
    if kind == "near_duplicate" and earlier:
        src = rng.choice(earlier)
        return {k: v.upper() for k, v in src.items()}
    return row


DEFECT_KINDS = (
    "hallucination_bait", "merged_instruction", "empty_output", "empty_code", "nooutput", "na_output",
    "empty_input", "unclear_instruction", "missing_input", "control_chars", "duplicate", "near_duplicate",
)  # fmt: skip


def alpaca_sized_rows(
    n: int, seed: int = 0, defect_fraction: float = 0.03, counts: dict[str, int] | None = None
) -> list[dict]:
    """`n` rows shaped like the original Alpaca set, for benchmarks: mean ~500 characters with the prompt
    template (~128 tokens), a long tail (capped at ~4,800 characters of output), ~40% with an input, a few
    code and non-English rows, and `defect_fraction` of the rows carrying one of the known defects (one kind
    of `DEFECT_KINDS` each; `counts`, when given, receives how many rows of each kind were made)."""
    rng = random.Random(seed)
    rows: list[dict] = []
    recent: list[dict] = []  # clean rows that duplicates are copied from
    for i in range(n):
        row = _sized_row(rng, i)
        if rng.random() < defect_fraction and (recent or i % len(DEFECT_KINDS) < 10):
            kind = DEFECT_KINDS[i % len(DEFECT_KINDS)]
            row = _inject(rng, row, kind, recent, i)
            if counts is not None:
                counts[kind] = counts.get(kind, 0) + 1
        else:
            recent.append(row)
            if len(recent) > 500:
                recent.pop(0)
        rows.append(row)
    return rows
