"""The paper protocol's MATH answer reading: the authors' `eval_math.py` and `util.py`, rule for rule.

Gold: the last `\\boxed` (else `\\fbox`) group of the solution, braces balanced, then its content when the group is
written exactly `\\boxed{...}` (otherwise there is no gold and the item is always wrong).
Prediction: the text after the last `The answer is: ` (exact case, colon and space), up to the first `.\\n`,
stripped, one final `.` removed; no marker means wrong.
Comparison: both strings normalised by Hendrycks' `strip_string` rules and compared for equality; when the
normalisation raises (an `\\text{ ` unit written twice, a lone `/` between non-integers, a `\\sqrt` or `\\frac` at
the very end ...), the raw strings are compared instead, exactly as the authors' `is_equiv` falls back.
"""

from __future__ import annotations

from typing import Optional

PAPER_MARKER = "The answer is: "


def closing_brace(text: str, opening: int) -> Optional[int]:
    """The index of the `}` that balances the `{` at `text[opening]`, or None when it is never closed."""
    depth = 0
    for index in range(opening, len(text)):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            depth -= 1
            if depth == 0:
                return index
    return None


def last_boxed_group(text: str) -> Optional[str]:
    """The last `\\boxed...{...}` (else `\\fbox...{...}`) of `text` up to its balancing brace, or None."""
    start = text.rfind("\\boxed")
    if start < 0:
        start = text.rfind("\\fbox")
        if start < 0:
            return None
    opening = text.find("{", start)
    closing = None if opening < 0 else closing_brace(text, opening)
    return None if closing is None else text[start : closing + 1]


def unbox(group: Optional[str]) -> Optional[str]:
    """The content of a group written exactly `\\boxed{...}`, else None."""
    prefix = "\\boxed{"
    if group is None or not group.startswith(prefix) or not group.endswith("}"):
        return None
    return group[len(prefix) : -1]


def gold_answer(solution: str) -> Optional[str]:
    """The authors' gold answer of a MATH solution (None when it has no `\\boxed{...}` group)."""
    return unbox(last_boxed_group(solution))


def extract_answer(completion: str) -> Optional[str]:
    """The authors' predicted answer string, or None when the completion has no `The answer is: `."""
    parts = completion.split(PAPER_MARKER)
    if len(parts) < 2:
        return None
    answer = parts[-1].split(".\n")[0].strip()
    if answer.endswith("."):
        answer = answer[:-1]
    return answer.strip()


def _without_units(text: str) -> str:
    """Drop a trailing `\\text{ unit}`; two of them raise (as the authors' assertion does)."""
    if "\\text{ " not in text:
        return text
    parts = text.split("\\text{ ")
    if len(parts) != 2:
        raise ValueError("more than one '\\text{ ' unit")
    return parts[0]


def _braced_sqrt(text: str) -> str:
    """`\\sqrt3` -> `\\sqrt{3}` (a `\\sqrt` with nothing after it raises)."""
    if "\\sqrt" not in text:
        return text
    pieces = text.split("\\sqrt")
    result = pieces[0]
    for piece in pieces[1:]:
        result += "\\sqrt" + piece if piece[0] == "{" else "\\sqrt{" + piece[0] + "}" + piece[1:]
    return result


def _braced_fractions(text: str) -> str:
    """`\\frac12` -> `\\frac{1}{2}`, `\\frac1{72}` -> `\\frac{1}{72}`; a one-character tail leaves `text` as it was."""
    pieces = text.split("\\frac")
    result = pieces[0]
    for piece in pieces[1:]:
        result += "\\frac"
        if piece[0] == "{":  # an empty piece raises, as in the authors' code
            result += piece
            continue
        if len(piece) < 2:
            return text
        numerator, second = piece[0], piece[1]
        if second != "{":
            result += "{" + numerator + "}{" + second + "}" + piece[2:]
        else:
            result += "{" + numerator + "}" + second + piece[2:]
    return result


def _slash_to_fraction(text: str) -> str:
    """`3/4` -> `\\frac{3}{4}` for integers written plainly; a lone `/` between non-integers raises."""
    parts = text.split("/")
    if len(parts) != 2:
        return text
    numerator, denominator = int(parts[0]), int(parts[1])  # ValueError propagates, as in the authors' code
    if text != f"{numerator}/{denominator}":
        return text
    return "\\frac{" + str(numerator) + "}{" + str(denominator) + "}"


def normalize(text: str) -> str:
    """Hendrycks' `strip_string` normalisation of an answer (may raise; see `is_equivalent`)."""
    text = text.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    text = text.replace("tfrac", "frac").replace("dfrac", "frac")
    text = text.replace("\\left", "").replace("\\right", "")
    text = text.replace("^{\\circ}", "").replace("^\\circ", "")
    text = text.replace("\\$", "")
    text = _without_units(text)
    # The authors remove `\%` twice (`replace("\\%", "")` then `replace("\%", "")`, the same string in Python), so
    # `3\\\%%` reads as `3`.
    text = text.replace("\\%", "").replace("\\%", "")
    text = text.replace(" .", " 0.").replace("{.", "{0.")
    if not text:
        return text
    if text[0] == ".":
        text = "0" + text
    sides = text.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:  # `k = 5` -> `5`
        text = sides[1]
    text = _braced_sqrt(text)
    text = text.replace(" ", "")
    text = _braced_fractions(text)
    if text == "0.5":
        text = "\\frac{1}{2}"
    return _slash_to_fraction(text)


def is_equivalent(prediction: Optional[str], gold: Optional[str]) -> bool:
    """The authors' `is_equiv`: equal after normalisation, or equal as raw strings when normalising raises."""
    if prediction is None and gold is None:
        return True
    if prediction is None or gold is None:
        return False
    try:
        return normalize(prediction) == normalize(gold)
    except Exception:  # the authors' bare fallback: any failure of the normalisation compares the raw strings
        return prediction == gold


def judge(completion: str, gold: Optional[str]) -> tuple[Optional[str], bool]:
    """The authors' extracted answer and whether it is equivalent to the gold answer."""
    extracted = extract_answer(completion)
    return extracted, extracted is not None and is_equivalent(extracted, gold)


__all__ = [
    "PAPER_MARKER",
    "extract_answer",
    "gold_answer",
    "is_equivalent",
    "judge",
    "last_boxed_group",
    "normalize",
    "unbox",
]
