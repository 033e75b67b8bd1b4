"""MATH: prompts, gold answers (the last `\\boxed{}` of the reference solution) and answer comparison.

Two protocols (see `protocols.py`) share the data (all 5,000 test problems: by default the seven subject configs
of `EleutherAI/hendrycks_math`, or a local file with `problem`/`solution` or the authors' `instruction`/`output`)
and the limit of 1,024 new tokens (the authors' `max_tokens=1024`). `paper` uses the authors' prompt (the Alpaca
template followed by one space: `### Response: `), their ten stop strings and their string comparison
(`math_paper.py`). `robust`, described below, uses the training template without that space, this project's two
stop strings and math-verify.

The gold answer is the content of the solution's last `\\boxed{...}` (or `\\fbox{...}`), parsed by math-verify as
`$\\boxed{<gold>}$`. The completion's answer is the text after its last `The answer is` (the MetaMath / paper
format), parsed as LaTeX math (`$<text>$`, or as written when it already has `$` or `\\boxed`); when there is no
such phrase, or it parses to nothing, math-verify reads the whole completion (its last `\\boxed{}`, or the last
expression). `math_verify.verify(gold, prediction)` decides equality (symbolic and numeric, sets, intervals,
matrices, equations).
"""

from __future__ import annotations

import functools
import logging
import re
from typing import Optional

from ..data.prompts import format_prompt
from . import math_paper
from .answers import EvaluationItem, protocol_tasks
from .common import DataFormatError
from .protocols import ROBUST

logger = logging.getLogger(__name__)

# Default: the full MATH test set (5,000 problems) as the seven subject configs of a maintained hub copy; the old
# full-set id `hendrycks/competition_math` has been withdrawn. `--data_file` takes a local copy instead.
HUB_ID = "EleutherAI/hendrycks_math"
HUB_CONFIG = (
    "algebra",
    "counting_and_probability",
    "geometry",
    "intermediate_algebra",
    "number_theory",
    "prealgebra",
    "precalculus",
)
MAX_NEW_TOKENS = 1024  # the authors' SamplingParams(max_tokens=1024)
FULL_SET_SIZE = 5000  # all of MATH's test problems, as the authors scored them
# The row fields: Hendrycks' release (`problem`, `solution`) or MetaMath's MATH_test.jsonl the authors read.
FIELD_NAMES = (("problem", "solution"), ("instruction", "output"))
ANSWER_MARKER = re.compile(r"the answer is\s*:?", re.IGNORECASE)
BOX_COMMANDS = ("\\boxed", "\\fbox")
# The answer text is already LaTeX math when it has an unescaped `$`, `\boxed`, `\(` or `\[`.
MATH_DELIMITERS = re.compile(r"(?<!\\)\$|\\boxed|\\\(|\\\[")


def _require_math_verify():
    """The math_verify module, or an error that says how to install it."""
    try:
        import math_verify
    except ImportError as error:
        raise ImportError(
            "Scoring MATH needs math-verify: `pip install 'math-verify[antlr4_13_2]'` "
            "(or `pip install -e 'peft[eval]'`)."
        ) from error
    return math_verify


def last_boxed_content(text: str) -> Optional[str]:
    """The content of the last `\\boxed{...}` / `\\fbox{...}` in `text` (braces balanced), or None."""
    start = max(text.rfind(command) for command in BOX_COMMANDS)
    if start < 0:
        return None
    command = next(command for command in BOX_COMMANDS if text.startswith(command, start))
    position = start + len(command)
    while position < len(text) and text[position] == " ":
        position += 1
    if position >= len(text):
        return None
    if text[position] != "{":  # `\boxed 5`: the argument runs to the next space or `$`
        match = re.match(r"[^\s$]+", text[position:])
        return match.group(0) if match else None
    closing = math_paper.closing_brace(text, position)
    return None if closing is None else text[position + 1 : closing]


def gold_answer(solution: str, where: str = "") -> str:
    """The gold answer of a MATH solution: the content of its last `\\boxed{}`."""
    answer = last_boxed_content(solution)
    if answer is None:
        raise DataFormatError(f"{where}: the MATH solution has no \\boxed{{...}} answer; is this the MATH test set?")
    return answer


# `\frac \pi4` (arguments without braces, one a command): math-verify 0.9 misreads it, so braces are added first.
BRACELESS_FRACTION = re.compile(r"\\([dt]?frac)\s*(\\[A-Za-z]+|[A-Za-z0-9])\s*(\\[A-Za-z]+|[A-Za-z0-9])")


def normalize_answer_latex(text: str) -> str:
    """Small repairs math-verify needs: line breaks to spaces, braces around bare `\frac` arguments, no final
    sentence period."""
    text = " ".join(text.split("\n"))
    text = BRACELESS_FRACTION.sub(lambda match: f"\\{match.group(1)}{{{match.group(2)}}}{{{match.group(3)}}}", text)
    text = text.strip()
    if text.endswith(".") and not text.endswith(".."):
        text = text[:-1].rstrip()
    return text


@functools.lru_cache(maxsize=8192)
def parse_gold(answer: str) -> tuple:
    """math-verify's parse of a gold answer (cached; a tuple so it can be cached)."""
    math_verify = _require_math_verify()
    return tuple(math_verify.parse(f"$\\boxed{{{normalize_answer_latex(answer)}}}$"))


def answer_text(completion: str) -> Optional[str]:
    """The text after the last `The answer is` in a completion, up to a blank line and normalized, or None."""
    markers = list(ANSWER_MARKER.finditer(completion))
    if not markers:
        return None
    text = completion[markers[-1].end() :].strip()
    text = normalize_answer_latex(text.split("\n\n", 1)[0])
    return text or None


def parse_prediction(completion: str) -> list:
    """math-verify's parse of a completion's answer (see the module docstring for the order of attempts)."""
    math_verify = _require_math_verify()
    text = answer_text(completion)
    if text is not None:
        wrapped = text if MATH_DELIMITERS.search(text) else f"${text}$"
        parsed = math_verify.parse(wrapped)
        if parsed:
            return parsed
    return math_verify.parse(completion)


def describe_parse(parsed: list) -> str:
    """The source text of a math-verify parse (its last element), falling back to the sympy form."""
    return parsed[-1] if isinstance(parsed[-1], str) else str(parsed[0])


def extract_answer(completion: str) -> Optional[str]:
    """A readable form of the answer math-verify finds in a completion, or None."""
    parsed = parse_prediction(completion)
    return describe_parse(parsed) if parsed else None


def judge(completion: str, gold: str) -> tuple[Optional[str], bool]:
    """The answer math-verify found in the completion (as text) and whether it equals the gold answer."""
    math_verify = _require_math_verify()
    prediction = parse_prediction(completion)
    if not prediction:
        return None, False
    extracted = describe_parse(prediction)
    gold_parsed = list(parse_gold(gold))
    if not gold_parsed:
        logger.warning("math-verify could not parse the gold answer %r; the item is scored wrong", gold)
        return extracted, False
    return extracted, bool(math_verify.verify(gold_parsed, prediction))


def is_equivalent(gold: str, completion: str) -> bool:
    """Whether math-verify finds the completion's answer equal to the gold answer."""
    return judge(completion, gold)[1]


def row_fields(row: dict) -> tuple[str, str]:
    """The problem and reference solution of a row in either accepted format (see FIELD_NAMES)."""
    for problem, solution in FIELD_NAMES:
        if problem in row and solution in row:
            return row[problem], row[solution]
    raise DataFormatError(f"a MATH row needs the fields {FIELD_NAMES[0]} or {FIELD_NAMES[1]}; it has {sorted(row)}.")


def build_item(index: int, row: dict) -> EvaluationItem:
    """The robust item of MATH row `index`: the problem as the Alpaca instruction, the boxed gold answer."""
    problem, solution = row_fields(row)
    return EvaluationItem(id=index, prompt=format_prompt(problem), gold=gold_answer(solution, f"row {index}"))


def build_paper_item(index: int, row: dict) -> EvaluationItem:
    """The paper item of MATH row `index`: the authors' prompt (`### Response: `, one trailing space), their gold."""
    problem, solution = row_fields(row)
    return EvaluationItem(id=index, prompt=format_prompt(problem) + " ", gold=math_paper.gold_answer(solution))


TASKS = protocol_tasks(
    paper=(build_paper_item, lambda completion, item: math_paper.judge(completion, item.gold)),
    robust=(build_item, lambda completion, item: judge(completion, item.gold)),
    name="math",
    default_data_file=HUB_ID,
    hub_config=HUB_CONFIG,
    field_names=FIELD_NAMES,
    max_new_tokens=MAX_NEW_TOKENS,
    full_set_size=FULL_SET_SIZE,
)
TASK = TASKS[ROBUST]

__all__ = [
    "FIELD_NAMES",
    "HUB_CONFIG",
    "TASKS",
    "build_paper_item",
    "row_fields",
    "HUB_ID",
    "MAX_NEW_TOKENS",
    "TASK",
    "answer_text",
    "build_item",
    "extract_answer",
    "gold_answer",
    "is_equivalent",
    "judge",
    "last_boxed_content",
    "normalize_answer_latex",
    "parse_gold",
    "parse_prediction",
]
