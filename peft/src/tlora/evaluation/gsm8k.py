"""GSM8K: prompts (the question as the Alpaca instruction), gold answers and numeric answer extraction.

Two protocols (see `protocols.py`) share the prompt (the authors' `problem_prompt` is this project's Alpaca
template, byte for byte) and differ in stop strings and answer reading.

`paper` (the authors' `eval_gsm8k.py`, `extract_answer_number`): the text after the last `The answer is: ` (exact
case, colon and space), its first match of `[-+]?\d*[.,/]?\d+`, as a float rounded to an integer with Python's
`round` (so `18.5` reads as 18, `1,234,567` as 1234, `3/4` as 1; a fraction is read with the PyPI package
`fraction`, their import, whose floating-point arithmetic can round a large `a/b` differently from exact arithmetic);
no marker or no number is wrong, and so is a number their script stops on with an error (`5/00`, a 400-digit
negative number). Gold: the integer after the first `#### `. Stop strings: the authors' ten (also applied to a
`--predictions` file, as vLLM applied them to their generations); at most 512 new tokens.

`robust` extraction, in order:
1. the first number after the last `The answer is` (the MetaMath / paper format; a colon is optional, case is
   ignored), or after the last `####` (GSM8K's own format);
2. otherwise the last number anywhere in the completion;
3. otherwise no answer (scored wrong).

A number may carry a sign (`-`, `+`, or the Unicode minus; not after a letter, digit or closing bracket, so
`16-3` reads as 16 and 3), a currency sign, thousands separators (`1,234,567`),
a decimal part (`2.50`, `.5`) or be a fraction (`3/4`); a trailing sentence period is not part of it. Answers are
compared exactly as rational numbers, so `18`, `18.0`, `18.00` and `36/2` all equal a gold `18`. (MetaMath's
script instead rounds the prediction to an integer and reads only the first group of `1,234,567`.)
"""

from __future__ import annotations

import logging
import re
import unicodedata
from fractions import Fraction
from typing import Optional

from ..data.prompts import format_prompt
from .answers import EvaluationItem, protocol_tasks
from .common import DataFormatError
from .protocols import ROBUST

logger = logging.getLogger(__name__)

HUB_ID = "openai/gsm8k"
HUB_CONFIG = "main"
MAX_NEW_TOKENS = 512  # the authors' SamplingParams(max_tokens=512)
FULL_SET_SIZE = 1319  # the GSM8K test split, all of which the authors scored
# The row fields: the GSM8K release (`question`, `answer`) or MetaMath's GSM8K_test.jsonl the authors read.
FIELD_NAMES = (("question", "answer"), ("query", "response"))
ANSWER_MARKERS = re.compile(r"the answer is|####", re.IGNORECASE)

# A sign counts only when it does not follow a word character or a closing bracket (so `16-3` is 16 and 3).
NUMBER_PATTERN = re.compile(
    r"(?:(?<![\w)\]])(?P<sign>[-+\u2212]))?\$?\s?"
    r"(?P<number>(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"
    r"(?:\s?/\s?(?P<denominator>\d+(?:\.\d+)?))?"
)


def _number_value(match: re.Match) -> Optional[Fraction]:
    """The exact value of a `NUMBER_PATTERN` match (None for a zero denominator)."""
    value = Fraction(match.group("number").replace(",", ""))
    if match.group("denominator") is not None:
        denominator = Fraction(match.group("denominator"))
        if denominator == 0:
            return None
        value = value / denominator
    if match.group("sign") in ("-", "\u2212"):
        value = -value
    return value


def format_number(value: Fraction) -> str:
    """A canonical text for a value: `18`, `-3`, `2.5`, or `1/3` when it has no finite decimal form."""
    if value.denominator == 1:
        return str(value.numerator)
    denominator = value.denominator
    for prime in (2, 5):
        while denominator % prime == 0:
            denominator //= prime
    if denominator == 1:
        text = f"{float(value):.12f}".rstrip("0").rstrip(".")
        if Fraction(text) == value:
            return text
    return f"{value.numerator}/{value.denominator}"


def parse_number(text: str) -> Optional[Fraction]:
    """The value of the first number in `text` (None when there is none)."""
    for match in NUMBER_PATTERN.finditer(text):
        value = _number_value(match)
        if value is not None:
            return value
    return None


def last_number(text: str) -> Optional[Fraction]:
    """The value of the last number in `text` (None when there is none)."""
    values = [_number_value(match) for match in NUMBER_PATTERN.finditer(text)]
    values = [value for value in values if value is not None]
    return values[-1] if values else None


def extract_answer(completion: str) -> Optional[str]:
    """The numeric answer of a completion as canonical text (see the module docstring), or None."""
    markers = list(ANSWER_MARKERS.finditer(completion))
    value = parse_number(completion[markers[-1].end() :]) if markers else None
    if value is None:
        value = last_number(completion)
    return None if value is None else format_number(value)


def gold_answer(solution: str, where: str = "") -> str:
    """The gold number of a GSM8K solution (the text after `####`), as canonical text."""
    if "####" not in solution:
        raise DataFormatError(f"{where}: the GSM8K answer has no '#### <number>' line; is this the GSM8K test set?")
    value = parse_number(solution.rsplit("####", 1)[1])
    if value is None:
        raise DataFormatError(f"{where}: no number after '####' in the GSM8K answer.")
    return format_number(value)


def answers_match(predicted: str, gold: str) -> bool:
    """Whether two canonical numbers are equal as rationals."""
    return Fraction(predicted) == Fraction(gold)


def judge(completion: str, gold: str) -> tuple[Optional[str], bool]:
    """The extracted answer of a completion and whether it equals the gold number."""
    extracted = extract_answer(completion)
    return extracted, extracted is not None and answers_match(extracted, gold)


# ---------------------------------------------------------------------------------------------------------------
# The paper protocol: the authors' reading, rule for rule (their code is not copied; see the module docstring)

PAPER_MARKER = "The answer is: "
PAPER_NUMBER = re.compile(r"[\-+]?\d*[\.,/]?\d+")


def _is_number(text: str) -> bool:
    """Whether `text` reads as a float or is a single Unicode numeric character (the authors' `is_number`)."""
    try:
        float(text)
        return True
    except ValueError:
        pass
    try:
        unicodedata.numeric(text)
        return True
    except (TypeError, ValueError):
        return False


def _paper_fraction_value(text: str) -> float:
    """`numerator / denominator` of `text` read by the PyPI package `fraction`, the authors' import (floating point
    inside, not exact); its own errors (a zero denominator such as `5/00`) become ValueError."""
    try:
        from fraction.Fraction import Fraction as PaperFraction, FractionException
    except ImportError as error:
        raise ImportError(
            "The paper protocol reads GSM8K fractions with the PyPI package `fraction`, as the authors' script does: "
            "`pip install fraction==2.2.0` (or `pip install -e 'peft[eval]'`)."
        ) from error
    try:
        value = PaperFraction(text)
    except FractionException as error:
        raise ValueError(f"fraction.FractionException: {error}") from error
    return value.numerator / value.denominator


def _paper_number(text: str) -> Optional[int]:
    """The authors' integer for a matched number (raises ArithmeticError or ValueError where their script stops)."""
    if "/" not in text:
        value = float(text.replace(",", ""))
        return None if value == float("inf") else round(value)  # only +inf is caught, as in their code
    numerator, denominator = text.split("/")[0], text.split("/")[1]
    if not (_is_number(numerator) and _is_number(denominator)):
        return None
    if denominator == "0":
        return round(float(numerator.replace(",", "")))
    return round(float(_paper_fraction_value(text.replace(",", ""))))


def paper_extract_answer(completion: str) -> Optional[int]:
    """The authors' answer: the first number after the last `The answer is: `, rounded to an integer, or None (also
    where their script stops with an error, such as `5/00` or a 400-digit negative number: scored wrong here)."""
    parts = completion.split(PAPER_MARKER)
    if len(parts) < 2:
        return None
    match = PAPER_NUMBER.search(parts[-1].strip())
    if match is None:
        return None
    try:
        return _paper_number(match.group())
    except (ArithmeticError, ValueError) as error:
        shown = match.group() if len(match.group()) <= 40 else match.group()[:37] + "..."
        logger.warning("The authors' script stops with an error on %r (%s); scored as no answer", shown, error)
        return None


def paper_gold_answer(solution: str, where: str = "") -> int:
    """The authors' gold number: the integer after the first `#### ` of the solution."""
    parts = solution.split("#### ")
    try:
        return int(parts[1].replace(",", ""))
    except (IndexError, ValueError) as error:
        raise DataFormatError(
            f"{where}: the GSM8K answer has no '#### <integer>' line; is this the GSM8K test set?"
        ) from error


def paper_judge(completion: str, gold: int) -> tuple[Optional[int], bool]:
    """The authors' extracted answer and whether it equals the gold integer (`float(pred) == float(gold)`)."""
    extracted = paper_extract_answer(completion)
    return extracted, extracted is not None and float(extracted) == float(gold)


# ---------------------------------------------------------------------------------------------------------------
# Tasks


def row_fields(row: dict) -> tuple[str, str]:
    """The question and worked solution of a row in either accepted format (see FIELD_NAMES)."""
    for question, answer in FIELD_NAMES:
        if question in row and answer in row:
            return row[question], row[answer]
    raise DataFormatError(f"a GSM8K row needs the fields {FIELD_NAMES[0]} or {FIELD_NAMES[1]}; it has {sorted(row)}.")


def build_item(index: int, row: dict) -> EvaluationItem:
    """The robust item of GSM8K row `index`: the question as the Alpaca instruction, the gold number as text."""
    question, solution = row_fields(row)
    return EvaluationItem(id=index, prompt=format_prompt(question), gold=gold_answer(solution, f"row {index}"))


def build_paper_item(index: int, row: dict) -> EvaluationItem:
    """The paper item of GSM8K row `index`: the authors' prompt (the Alpaca template) and their integer gold."""
    question, solution = row_fields(row)
    return EvaluationItem(id=index, prompt=format_prompt(question), gold=paper_gold_answer(solution, f"row {index}"))


TASKS = protocol_tasks(
    paper=(build_paper_item, lambda completion, item: paper_judge(completion, item.gold)),
    robust=(build_item, lambda completion, item: judge(completion, item.gold)),
    name="gsm8k",
    default_data_file=HUB_ID,
    hub_config=HUB_CONFIG,
    field_names=FIELD_NAMES,
    max_new_tokens=MAX_NEW_TOKENS,
    full_set_size=FULL_SET_SIZE,
)
TASK = TASKS[ROBUST]

__all__ = [
    "FIELD_NAMES",
    "TASKS",
    "build_paper_item",
    "paper_extract_answer",
    "paper_gold_answer",
    "paper_judge",
    "row_fields",
    "HUB_CONFIG",
    "HUB_ID",
    "MAX_NEW_TOKENS",
    "TASK",
    "answers_match",
    "build_item",
    "extract_answer",
    "format_number",
    "gold_answer",
    "judge",
    "last_number",
    "parse_number",
]
