"""Evaluation protocols: which prompts, stop strings, token limits, data and answer reading produced a number.

Two protocols exist for every scorer that the authors published a script for:

* `paper` reproduces the authors' evaluation scripts (github.com/Rambo-Yi/TLora, `evaluate/math/eval_gsm8k.py`,
  `evaluate/math/eval_math.py` with `util.py`, `evaluate/code/gen_vllm.py` and `code_process.py`): their prompt text
  to the byte, their ten stop strings (also cut into the completions of a `--predictions` file, as vLLM cut theirs),
  their token limits, their full test sets and their answer reading. A number from it can be put beside the paper's
  table.
* `robust` is this project's reading (exact rational comparison for GSM8K, math-verify for MATH, a code clean-up
  that keeps indentation); it scores what a model means more often, so it is not comparable with the paper.

Every result JSON records `protocol` and `data` (`source`, `num_items`, `expected_items`, `subset`); the report
prints them beside each number and compares with the paper only where the protocol is `paper` on the full set.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

PAPER = "paper"
ROBUST = "robust"
PROTOCOLS = (PAPER, ROBUST)
DEFAULT_PROTOCOL = PAPER  # so `python math/eval_gsm8k.py --model PATH` is comparable with the paper's table
UNRECORDED = "unrecorded"  # results written before protocols were recorded

# The authors' `stop_tokens` (eval_gsm8k.py and eval_math.py, the same ten strings in both, in this order). vLLM
# cut their completions at these; under `paper`, completions read from a predictions file are cut the same way.
PAPER_STOP_STRINGS = (
    "Question:",
    "Question",
    "USER:",
    "USER",
    "ASSISTANT:",
    "ASSISTANT",
    "Instruction:",
    "Instruction",
    "Response:",
    "Response",
)

# This project's stop strings: the next Alpaca example starting means the answer is over (EOS also ends it).
ROBUST_STOP_STRINGS = ("### Instruction", "Below is an instruction")



def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` cut just before the earliest occurrence of any stop string (vLLM's rule, the stop string excluded)."""
    end = len(text)
    for stop_string in stop:
        if stop_string:
            position = text.find(stop_string)
            if position != -1:
                end = min(end, position)
    return text[:end]


def check_protocol(protocol: str) -> str:
    """`protocol` itself, or a ValueError naming the protocols there are."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"Unknown evaluation protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}.")
    return protocol


def data_record(source: str, num_items: int, expected: Optional[int], *, subset: bool = False) -> dict[str, Any]:
    """The `data` entry of a result: where the items came from, how many were scored, the full set's size (as the
    authors scored it; None for a task without one)."""
    return {
        "source": source,
        "num_items": num_items,
        "expected_items": expected,
        "subset": bool(subset) or (expected is not None and num_items != expected),
    }


def check_full_set(task: str, expected: Optional[int], num_items: int, source: str, allow_subset: bool) -> None:
    """Under the paper protocol, raise unless `source` holds the full test set of `expected` items (or a subset was
    asked for)."""
    if allow_subset or expected is None or num_items == expected:
        return
    raise ValueError(
        f"{source} holds {num_items} {task} items, but the paper's protocol scores all {expected}; pass the full "
        "test set, or pass --allow_subset to score these items anyway (the result then records a subset and the "
        "report does not compare it with the paper)."
    )


__all__ = [
    "DEFAULT_PROTOCOL",
    "PAPER",
    "PAPER_STOP_STRINGS",
    "PROTOCOLS",
    "ROBUST",
    "ROBUST_STOP_STRINGS",
    "UNRECORDED",
    "check_full_set",
    "check_protocol",
    "data_record",
    "truncate_at_stop",
]
