"""Code prompts and clean-up: the Alpaca instruction of a task, the paper's post-processing of a completion (this
project's and the authors'), and the program that is run.

Prompts (the training data, CodeFeedback, is instruction -> answer, so both use the paper's Alpaca prompt):

* HumanEval: instruction `HUMANEVAL_INSTRUCTION` = "Complete the following Python code:\\n" + the task's prompt
  (signature and docstring). The completion is what follows the prompt: a function body, or (more often for an
  instruction-tuned model) the whole function again, which is fine because the program scored is
  `prompt + completion` and the later definition wins.
* MBPP: instruction `MBPP_INSTRUCTION` = the problem text, a newline, then the first test assertion (which fixes
  the function name); the completion is the whole program.

Post-processing (`postprocess_completion`), as the paper's scripts did, with two fixes:
1. if the text holds a Markdown code fence, keep the first Python (or untagged) fenced block; indentation is kept
   (the published script `strip()`s the block, which breaks completions that are an indented function body);
2. cut at `if __name__ == "__main__":`;
3. cut trailing top-level example code: from the first column-0 `# Example usage`-style comment, `assert` or
   `print(` line onwards, but only when no top-level `def`, `class` or `import` follows (the published script
   cuts at the first occurrence of the text "assert" or "# Example usage" anywhere, which also truncates functions
   that use `assert` inside their body).
The raw completion is kept beside the post-processed one in the predictions file and in every record.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

from ..data.prompts import format_prompt
from .code_data import CodeTask
from .protocols import PAPER, ROBUST, check_protocol

# The one place where the code instructions are written (see the module docstring).
HUMANEVAL_INSTRUCTION = "Complete the following Python code:\n{prompt}"
MBPP_INSTRUCTION = "{text}\n{test}"


def build_instruction(dataset: str, task: CodeTask) -> str:
    """The Alpaca instruction for a task (see HUMANEVAL_INSTRUCTION / MBPP_INSTRUCTION)."""
    if dataset == "humaneval":
        return HUMANEVAL_INSTRUCTION.format(prompt=task.text.rstrip())
    return MBPP_INSTRUCTION.format(text=task.text, test=task.example_test)


def build_prompt(dataset: str, task: CodeTask) -> str:
    """The full model prompt: the paper's Alpaca template around the task's instruction."""
    return format_prompt(build_instruction(dataset, task))


FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:\n[ \t]*```|\Z)", re.S)
MAIN_GUARD = re.compile(r"^if\s+__name__\s*==\s*['\"]__main__['\"]\s*:", re.M)
EXAMPLE_LINE = re.compile(
    r"^(?:#\s*(?:example|examples|usage|sample|test|tests|testing|test cases?)\b|assert\b|print\s*\()", re.I
)
TOP_LEVEL_DEFINITION = re.compile(r"^(?:def |async def |class |import |from \S+ import |@)")
PYTHON_FENCE_TAGS = {"", "python", "python3", "py", "py3"}


def extract_code_block(text: str) -> str:
    """The first Python (or untagged) fenced block of `text`, indentation kept; `text` itself if it has none."""
    for match in FENCE.finditer(text):
        if match.group(1).lower() in PYTHON_FENCE_TAGS:
            return match.group(2)
    return text


def strip_trailing_examples(code: str) -> str:
    """Drop top-level example code (comments like `# Example usage`, `assert`, `print(`) after the last definition."""
    lines = code.split("\n")
    for index, line in enumerate(lines):
        if EXAMPLE_LINE.match(line) and not any(TOP_LEVEL_DEFINITION.match(rest) for rest in lines[index + 1 :]):
            return "\n".join(lines[:index])
    return code


def postprocess_completion(text: str) -> str:
    """The paper's clean-up of a raw completion: code fence, `__main__` block and example usage removed."""
    code = extract_code_block(text.replace("\r", ""))
    main = MAIN_GUARD.search(code)
    if main is not None:
        code = code[: main.start()]
    code = strip_trailing_examples(code)
    lines = code.split("\n")
    while lines and not lines[0].strip():
        lines.pop(0)
    return "\n".join(lines).rstrip() + "\n" if any(line.strip() for line in lines) else ""


def paper_postprocess_completion(text: str) -> str:
    """The authors' clean-up (`code_process.py`), rule for rule: from the first ```` ```python ```` fence to the next
    line starting with ```` ``` ````, then cut at `if __name__ == "__main__":`, at the first `# Example usage` and at
    the first `assert` anywhere, stripping the text after each cut."""
    code = text.replace("\r", "")
    if "```python" in code:
        code = code[code.index("```python") :].strip().replace("```python", "")
        if "\n```" in code:
            code = code[: code.index("\n```")].strip()
    # The authors test for `__name__ == "__main__"` and cut at `if __name__ == "__main__":` (their script fails when
    # only the first is present; here that completion is kept as it is).
    guard = 'if __name__ == "__main__":'
    if '__name__ == "__main__"' in code and guard in code:
        code = code[: code.index(guard)].strip()
    for marker in ("# Example usage", "assert"):
        if marker in code:
            code = code[: code.index(marker)].strip()
    return code


@dataclass(frozen=True)
class CodeProtocol:
    """What a protocol means for code: stop strings, clean-up, the program run, and whether EvalPlus must score."""

    stop: Optional[tuple[str, ...]]  # None: the robust stop strings (the generation default)
    postprocess: Callable[[str], str]
    prompt_in_solution: bool  # MBPP too runs `prompt + completion` (as `evalplus.evaluate` builds it)
    needs_evalplus: bool  # scored with EvalPlus's base and plus tests only


CODE_PROTOCOLS = {
    # The authors' gen_vllm.py and code_process.py: no stop strings, their clean-up, EvalPlus's scoring.
    PAPER: CodeProtocol(
        stop=(), postprocess=paper_postprocess_completion, prompt_in_solution=True, needs_evalplus=True
    ),
    ROBUST: CodeProtocol(stop=None, postprocess=postprocess_completion, prompt_in_solution=False, needs_evalplus=False),
}


def code_protocol(protocol: str) -> CodeProtocol:
    """The code meaning of a protocol name (checked)."""
    return CODE_PROTOCOLS[check_protocol(protocol)]


def postprocess_for(protocol: str) -> Callable[[str], str]:
    """The clean-up of a protocol: the authors' for `paper`, this project's for `robust`."""
    return code_protocol(protocol).postprocess


def build_solution(dataset: str, task_prompt: str, completion: str, protocol: str = ROBUST) -> str:
    """The program that is run: `prompt + completion` for HumanEval (and for MBPP+ under the paper protocol, as
    `evalplus.evaluate` builds it), the completion itself for MBPP."""
    if dataset == "humaneval" or code_protocol(protocol).prompt_in_solution:
        return task_prompt + completion
    return completion


__all__ = [
    "CODE_PROTOCOLS",
    "CodeProtocol",
    "code_protocol",
    "HUMANEVAL_INSTRUCTION",
    "MBPP_INSTRUCTION",
    "build_instruction",
    "build_prompt",
    "build_solution",
    "extract_code_block",
    "paper_postprocess_completion",
    "postprocess_completion",
    "postprocess_for",
    "strip_trailing_examples",
]
