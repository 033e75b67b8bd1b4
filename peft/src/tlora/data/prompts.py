"""The Alpaca prompt used for training and evaluation (the paper's template, and the variant with an input field)."""

from __future__ import annotations

from typing import Optional

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)

ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)


def format_prompt(instruction: str, input: Optional[str] = None) -> str:
    """The Alpaca prompt for `instruction`, with the `### Input:` section when `input` is non-empty."""
    if input is not None and input.strip():
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT.format(instruction=instruction)


__all__ = ["ALPACA_PROMPT", "ALPACA_PROMPT_WITH_INPUT", "format_prompt"]
