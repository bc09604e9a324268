"""The one Alpaca prompt template, used for training, inference and the logged model."""

from __future__ import annotations

from typing import TypedDict

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
RESPONSE_MARKER = "### Response:"


class AlpacaRow(TypedDict, total=False):
    instruction: str
    input: str
    output: str


def build_prompt(instruction: str, input: str = "") -> str:
    """The prompt part (everything the model is given); the response follows it directly."""
    if input and input.strip():
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def extract_response(generated: str) -> str:
    """The answer from a decoded generation that may still contain the prompt."""
    if RESPONSE_MARKER in generated:
        generated = generated.split(RESPONSE_MARKER, 1)[1]
    return generated.strip()
