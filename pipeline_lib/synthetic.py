"""Alpaca-format rows generated from templates: the smoke data set, test fixtures and benchmark input.

Deterministic for a given seed. Rows are short, varied and factual enough for a tiny model to learn
something measurable in a few minutes on a CPU.
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
    ("Kenya", "Nairobi"),
    ("Germany", "Berlin"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Egypt", "Cairo"),
    ("India", "New Delhi"),
    ("Peru", "Lima"),
    ("Norway", "Oslo"),
    ("Chile", "Santiago"),
    ("Poland", "Warsaw"),
    ("Greece", "Athens"),
]
BOOKS = [
    ("To Kill a Mockingbird", "Harper Lee"),
    ("1984", "George Orwell"),
    ("Pride and Prejudice", "Jane Austen"),
    ("Moby-Dick", "Herman Melville"),
    ("Hamlet", "William Shakespeare"),
    ("War and Peace", "Leo Tolstoy"),
]
PAINTINGS = [
    ("The Starry Night", "Vincent van Gogh"),
    ("Mona Lisa", "Leonardo da Vinci"),
    ("The Persistence of Memory", "Salvador Dali"),
    ("Guernica", "Pablo Picasso"),
]
FORMULAS = [("table salt", "NaCl"), ("water", "H2O"), ("carbon dioxide", "CO2"), ("methane", "CH4")]
THREATS = ["phishing", "malware", "ransomware", "denial of service", "SQL injection", "spyware"]
ADJECTIVES = ["happy", "slow", "bright", "quiet", "strong", "gentle", "brave", "calm"]
SENTENCES = [
    "The weather today is wonderful and sunny.",
    "I did not enjoy the movie at all.",
    "The service at the restaurant was excellent.",
    "This product broke after one day.",
    "Our team finished the project on time.",
]


def _rows(rng: random.Random) -> list[dict]:
    country, capital = rng.choice(CAPITALS)
    book, author = rng.choice(BOOKS)
    painting, painter = rng.choice(PAINTINGS)
    thing, formula = rng.choice(FORMULAS)
    a, x = rng.randint(2, 9), rng.randint(1, 12)
    b = rng.randint(1, 20)
    c = a * x + b
    r = rng.randint(1, 10)
    adj = rng.choice(ADJECTIVES)
    sent = rng.choice(SENTENCES)
    positive = any(w in sent for w in ("wonderful", "excellent", "on time"))
    threats = rng.sample(THREATS, 3)
    return [
        {
            "instruction": f"What is the capital city of {country}?",
            "input": "",
            "output": f"The capital city of {country} is {capital}.",
        },
        {
            "instruction": "Name the capital of the given country.",
            "input": country,
            "output": f"{capital} is the capital of {country}.",
        },
        {
            "instruction": f'Who wrote the novel "{book}"?',
            "input": "",
            "output": f'"{book}" was written by {author}.',
        },
        {
            "instruction": f'Who painted "{painting}"?',
            "input": "",
            "output": f'"{painting}" was painted by {painter}.',
        },
        {
            "instruction": f"What is the chemical formula for {thing}?",
            "input": "",
            "output": f"The chemical formula for {thing} is {formula}.",
        },
        {
            "instruction": f"Solve the equation {a}x + {b} = {c}.",
            "input": "",
            "output": f"Subtract {b} from both sides to get {a}x = {c - b}, then divide by {a}: x = {x}.",
        },
        {
            "instruction": "Calculate the area of a circle with the given radius.",
            "input": f"radius = {r}",
            "output": f"The area is pi * r ** 2 = 3.14159 * {r * r} = {3.14159 * r * r:.2f}.",
        },
        {
            "instruction": "Name three common cybersecurity threats.",
            "input": "",
            "output": f"Three common threats are {threats[0]}, {threats[1]} and {threats[2]}.",
        },
        {
            "instruction": "Write a Python function that sums two vectors.",
            "input": "",
            "output": "def add_vectors(a, b):\n    return [x + y for x, y in zip(a, b)]",
        },
        {
            "instruction": "Classify the sentiment of the sentence as positive or negative.",
            "input": sent,
            "output": "positive" if positive else "negative",
        },
        {
            "instruction": f"Give a synonym of the word '{adj}'.",
            "input": "",
            "output": {
                "happy": "joyful",
                "slow": "sluggish",
                "bright": "shiny",
                "quiet": "silent",
                "strong": "powerful",
                "gentle": "kind",
                "brave": "courageous",
                "calm": "peaceful",
            }[adj],
        },
        {
            "instruction": "Rewrite the sentence in the past tense.",
            "input": "She walks to school every day.",
            "output": "She walked to school every day.",
        },
        {
            "instruction": "Explain what machine learning is in one sentence.",
            "input": "",
            "output": "Machine learning is a way for computers to learn patterns from data without being explicitly programmed.",
        },
        {
            "instruction": "Who was the first person to walk on the moon?",
            "input": "",
            "output": "Neil Armstrong was the first person to walk on the moon, in 1969.",
        },
    ]


def alpaca_rows(n: int, seed: int = 0) -> list[dict]:
    """`n` clean Alpaca-format rows (instruction, input, output), deterministic for `seed`."""
    rng = random.Random(seed)
    out: list[dict] = []
    while len(out) < n:
        out.extend(_rows(rng))
    rng.shuffle(out)
    return out[:n]


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
