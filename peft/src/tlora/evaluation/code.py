"""Code generation: HumanEval and MBPP prompts, the paper's post-processing, and pass@1 scoring.

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

Task sets: EvalPlus's task ids (HumanEval+: the 164 HumanEval tasks; MBPP+ v0.2.0: 378 of the 427 sanitized
tasks), read from EvalPlus's data file (`--evalplus_file`, else `HUMANEVAL_OVERRIDE_PATH` / `MBPP_OVERRIDE_PATH`,
else the file EvalPlus cached in `~/.cache/evalplus`). Generation and scoring fail, naming the first missing task,
when the test data or the predictions lack any of them, unless `--allow_subset` (or `--limit`) asks for a subset,
which the result records (`data.subset`). The default MBPP source is all four splits of the hub's sanitized MBPP
(427 tasks; its `test` split alone holds only 257).

Protocols (`protocols.py`): `robust` is what this docstring describes. `paper` follows the authors'
`evaluate/code/gen_vllm.py` and `code_process.py`: no stop strings, at most 1,024 new tokens, their clean-up
(`paper_postprocess_completion`), and EvalPlus's scoring of `prompt + completion` on the base and plus tests (so it
needs EvalPlus's data file). The authors' prompts come from a `python` test file of PiSSA's dataset that is not
public in this form; the paper protocol uses this project's prompts (a difference listed in the README).

Scoring: with EvalPlus's data (HumanEval+ / MBPP+ files named by `HUMANEVAL_OVERRIDE_PATH` / `MBPP_OVERRIDE_PATH`
or `--evalplus_file`) each solution is checked by EvalPlus's own checker (`evalplus.eval.untrusted_check`) on the base
and the plus inputs and compared with the canonical solution's outputs, as `evalplus.evaluate` does: `pass@1` is the
base score and `pass@1_plus` the base+plus score, over the EvalPlus task set (164 HumanEval, 378 MBPP tasks).
Without that data the original tests (HumanEval's `check`, MBPP's `test_list` assertions) run in this package's
sandbox (`sandbox.py`); `pass@1_plus` is then null and MBPP counts all 427 sanitized tasks. Either way the tests run
in a trusted judge and the solution in an isolated solver (bubblewrap namespaces, uid 65534, memory, CPU, per-test
and wall-clock limits) that only answers calls, so a solution cannot write its own verdict (see `sandbox.py`); where
the isolation is missing, scoring stops unless `unsafe_execution`, which the result records.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from collections import defaultdict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from ..data.prompts import format_prompt
from .common import DataFormatError, check_prediction_ids, load_rows, read_jsonl, require_fields
from .protocols import PAPER, ROBUST, ROBUST_STOP_STRINGS, check_protocol, data_record
from .sandbox import (
    JUDGE_PATH,
    HelperPool,
    ProgramJob,
    SandboxLimits,
    default_workers,
    helper_config,
    resolve_isolation,
    run_programs,
)

logger = logging.getLogger(__name__)

DATASETS = ("humaneval", "mbpp")

# Default test sets: hub ids (the files in ../shared/data use the same formats).
HUMANEVAL_HUB_ID = "openai/openai_humaneval"
MBPP_HUB_ID = "google-research-datasets/mbpp"
MBPP_HUB_CONFIG = "sanitized"
MBPP_HUB_SPLITS = "prompt+train+validation+test"  # all 427 sanitized tasks (the test split alone has 257)
HUMANEVAL_TASK_COUNT = 164  # HumanEval+ keeps every HumanEval task
DEFAULT_DATA_FILES = {"humaneval": HUMANEVAL_HUB_ID, "mbpp": MBPP_HUB_ID}

# EvalPlus data (HumanEval+ / MBPP+ JSON lines), read from the same variables EvalPlus itself reads.
EVALPLUS_ENVIRONMENT = {"humaneval": "HUMANEVAL_OVERRIDE_PATH", "mbpp": "MBPP_OVERRIDE_PATH"}

# The one place where the code instructions are written (see the module docstring).
HUMANEVAL_INSTRUCTION = "Complete the following Python code:\n{prompt}"
MBPP_INSTRUCTION = "{text}\n{test}"

# The paper's generation limit for code (the published vLLM script uses max_tokens=1024).
MAX_NEW_TOKENS = 1024


@dataclass
class CodeTask:
    """One HumanEval or MBPP problem in a common shape."""

    task_id: str  # "HumanEval/0", "Mbpp/2"
    text: str  # HumanEval: signature + docstring; MBPP: the problem statement
    entry_point: str
    tests: list[str]  # each runs after the program; all must pass
    setup: str = ""  # runs after the program, before the tests (MBPP's test_imports)
    reference: str = ""  # the full reference program (to check the harness)
    example_test: str = ""  # MBPP: the assertion shown in the prompt


# ----------------------------------------------------------------------------------------------------------------
# Data


def normalise_task_id(dataset: str, task_id: Any) -> str:
    """`HumanEval/N` or `Mbpp/N` for the many spellings in the wild (`2`, `"2"`, `"Mbpp/2"`, `"MBPP/2"`)."""
    text = str(task_id).strip()
    if dataset == "mbpp":
        number = text.rsplit("/", 1)[-1]
        return f"Mbpp/{int(number)}" if number.isdigit() else text
    if text.isdigit():
        return f"HumanEval/{int(text)}"
    return text


def _humaneval_task(row: Mapping) -> CodeTask:
    """A CodeTask from a HumanEval row (`task_id`, `prompt`, `canonical_solution`, `test`, `entry_point`)."""
    entry_point = row["entry_point"]
    return CodeTask(
        task_id=normalise_task_id("humaneval", row["task_id"]),
        text=row["prompt"],
        entry_point=entry_point,
        tests=[f"{row['test']}\n\ncheck({entry_point})\n"],
        reference=row["prompt"] + row.get("canonical_solution", ""),
    )


def mbpp_entry_point(row: Mapping) -> str:
    """The function an MBPP problem asks for: the first name called in its first test (or defined in its code)."""
    for test in row.get("test_list", []):
        for name in re.findall(r"([A-Za-z_]\w*)\s*\(", test):
            if name not in {
                "set",
                "math",
                "isclose",
                "sorted",
                "list",
                "tuple",
                "abs",
                "round",
                "str",
                "len",
                "int",
                "float",
                "frozenset",
                "dict",
                "type",
            } and f"def {name}" in row.get("code", ""):
                return name
    match = re.search(r"^def\s+([A-Za-z_]\w*)", row.get("code", ""), re.M)
    return match.group(1) if match else ""


def _mbpp_task(row: Mapping) -> CodeTask:
    """A CodeTask from a sanitized-MBPP row (`task_id`, `prompt`, `code`, `test_imports`, `test_list`)."""
    tests = list(row["test_list"])
    return CodeTask(
        task_id=normalise_task_id("mbpp", row["task_id"]),
        text=row["prompt"],
        entry_point=mbpp_entry_point(row),
        tests=tests,
        setup="\n".join(row.get("test_imports") or []),
        reference=row.get("code", ""),
        example_test=tests[0] if tests else "",
    )


def load_code_tasks(dataset: str, data_file: Optional[str] = None, limit: Optional[int] = None) -> list[CodeTask]:
    """The HumanEval or MBPP (sanitized) test problems from a local file or the hub (default: the hub id)."""
    check_dataset(dataset)
    source = data_file or DEFAULT_DATA_FILES[dataset]
    if dataset == "humaneval":
        rows = load_rows(source, hub_split="test")
        require_fields(rows, ("task_id", "prompt", "test", "entry_point"), source)
        tasks = [_humaneval_task(row) for row in rows]
    else:
        rows = load_rows(source, hub_config=MBPP_HUB_CONFIG, hub_split=MBPP_HUB_SPLITS)
        if rows and "text" in rows[0] and "prompt" not in rows[0]:
            raise DataFormatError(
                f"{source} looks like the full MBPP release (field 'text'); pass the sanitized set "
                "(sanitized-mbpp.json, fields 'prompt', 'code', 'test_imports', 'test_list')."
            )
        require_fields(rows, ("task_id", "prompt", "test_list"), source)
        tasks = [_mbpp_task(row) for row in rows]
    return tasks[:limit] if limit is not None else tasks


def check_dataset(dataset: str) -> None:
    """Raise a helpful error for an unknown dataset name."""
    if dataset not in DATASETS:
        raise ValueError(f"Unknown code dataset {dataset!r}; use one of {', '.join(DATASETS)}.")


# ----------------------------------------------------------------------------------------------------------------
# Prompts and post-processing


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


def postprocess_for(protocol: str):
    """The clean-up of a protocol: the authors' for `paper`, this project's for `robust`."""
    return paper_postprocess_completion if check_protocol(protocol) == PAPER else postprocess_completion


def build_solution(dataset: str, task_prompt: str, completion: str, protocol: str = ROBUST) -> str:
    """The program that is run: `prompt + completion` for HumanEval (and for MBPP+ under the paper protocol, as
    `evalplus.evaluate` builds it), the completion itself for MBPP."""
    if dataset == "humaneval" or protocol == PAPER:
        return task_prompt + completion
    return completion


# ----------------------------------------------------------------------------------------------------------------
# Generation


def generation_settings(
    max_new_tokens: Optional[int] = None, batch_size: int = 16, seed: int = 0, protocol: str = ROBUST
):
    """Greedy decoding with the paper's code limit; the Alpaca stop strings (robust) or none (the authors')."""
    from .generation import GenerationSettings

    return GenerationSettings(
        max_new_tokens=max_new_tokens or MAX_NEW_TOKENS,
        temperature=0.0,
        top_p=1.0,
        stop=[] if check_protocol(protocol) == PAPER else list(ROBUST_STOP_STRINGS),
        batch_size=batch_size,
        seed=seed,
    )


def generate_code_predictions(
    dataset: str, tasks: Sequence[CodeTask], backend, settings, protocol: str = ROBUST
) -> list[dict]:
    """One predictions row per task: task_id, model prompt, raw completion and post-processed completion."""
    postprocess = postprocess_for(protocol)
    prompts = [build_prompt(dataset, task) for task in tasks]
    started = time.monotonic()
    texts = backend.generate(prompts, settings)
    logger.info("Generated %d %s completions in %.1f s", len(texts), dataset, time.monotonic() - started)
    return [
        {
            "task_id": task.task_id,
            "prompt": prompt,
            "raw_completion": text,
            "completion": postprocess(text),
        }
        for task, prompt, text in zip(tasks, prompts, texts, strict=True)
    ]


def reference_predictions(dataset: str, tasks: Sequence[CodeTask]) -> list[dict]:
    """Predictions made of the reference solutions (HumanEval canonical bodies, MBPP reference programs)."""
    rows = []
    for task in tasks:
        completion = task.reference[len(task.text) :] if dataset == "humaneval" else task.reference
        rows.append({"task_id": task.task_id, "completion": completion})
    return rows


def read_code_predictions(
    path: str, dataset: str, task_ids: Optional[Collection[str]] = None, *, data: str = "the test data"
) -> list[dict]:
    """The rows of a code predictions file (`{"task_id", "completion"}` and optionally `raw_completion`, `prompt`),
    one per task, every task among `task_ids` (the tasks of `data`) when given."""
    rows = read_jsonl(path)
    for line_number, row in enumerate(rows, start=1):
        where = f"{path}, line {line_number}"
        if "task_id" not in row:
            raise DataFormatError(f'{where}: missing \'task_id\' (e.g. "HumanEval/0" or "Mbpp/2").')
        if not isinstance(row.get("completion"), str):
            if isinstance(row.get("solution"), str) and dataset == "mbpp":
                row["completion"] = row["solution"]
            else:
                raise DataFormatError(
                    f"{where}: 'completion' must be a string (HumanEval: the code after the prompt; MBPP: the "
                    "whole program)."
                )
        row["task_id"] = normalise_task_id(dataset, row["task_id"])
    known_ids = None if task_ids is None else set(task_ids)
    check_prediction_ids(
        rows,
        [row["task_id"] for row in rows],
        None if known_ids is None else known_ids.__contains__,
        data=data,
        describe=lambda task_id: f"task {task_id}",
    )
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Scoring


def evalplus_cache_file(dataset: str) -> str:
    """Where EvalPlus keeps its downloaded HumanEval+ / MBPP+ file (its own naming and default versions)."""
    from evalplus.data.humaneval import HUMANEVAL_PLUS_VERSION
    from evalplus.data.mbpp import MBPP_PLUS_VERSION
    from evalplus.data.utils import get_dataset_metadata

    name, version = {"humaneval": ("HumanEvalPlus", HUMANEVAL_PLUS_VERSION), "mbpp": ("MbppPlus", MBPP_PLUS_VERSION)}[
        dataset
    ]
    return get_dataset_metadata(name, version, mini=False)[1]


def evalplus_data_file(dataset: str, explicit: Optional[str] = None) -> Optional[str]:
    """The EvalPlus data file: `explicit`, else the variable EvalPlus reads, else EvalPlus's cached download, else
    None (nothing is downloaded here)."""
    path = explicit or os.environ.get(EVALPLUS_ENVIRONMENT[dataset])
    if path and not os.path.isfile(os.path.expanduser(path)):
        raise FileNotFoundError(
            f"EvalPlus data file {path} does not exist; download HumanEvalPlus.jsonl / MbppPlus.jsonl from the "
            f"EvalPlus releases and point {EVALPLUS_ENVIRONMENT[dataset]} (or --evalplus_file) at it, or unset it "
            "to score with the original tests."
        )
    if path:
        return os.path.expanduser(path)
    try:
        cached = evalplus_cache_file(dataset)
    except ImportError:
        return None
    return cached if os.path.isfile(cached) else None


def expected_task_ids(dataset: str, evalplus_file: Optional[str]) -> tuple[Optional[list[str]], str]:
    """EvalPlus's task ids for `dataset` and where they came from (None for MBPP when no MBPP+ file is at hand)."""
    if evalplus_file is not None:
        return [normalise_task_id(dataset, row["task_id"]) for row in read_jsonl(evalplus_file)], evalplus_file
    if dataset == "humaneval":
        return [f"HumanEval/{index}" for index in range(HUMANEVAL_TASK_COUNT)], "HumanEval+ task ids (HumanEval/0-163)"
    return None, "unknown (no MBPP+ file)"


def select_tasks(
    dataset: str,
    tasks: Sequence[CodeTask],
    evalplus_file: Optional[str],
    *,
    source: str,
    allow_subset: bool = False,
) -> tuple[list[CodeTask], str]:
    """The tasks to generate for or score: EvalPlus's task set, all of it present in `tasks` unless `allow_subset`
    (then the tasks of `tasks` that EvalPlus's file holds, or all of them without a file); and the task set's source.
    """
    expected, task_set = expected_task_ids(dataset, evalplus_file)
    by_id = {task.task_id: task for task in tasks}
    if allow_subset:
        wanted = set(expected) if evalplus_file is not None else set(by_id)
        return [task for task in tasks if task.task_id in wanted], task_set
    if expected is None:
        raise FileNotFoundError(
            "The MBPP+ task set (378 tasks) is read from EvalPlus's MbppPlus.jsonl, which is not at hand: run "
            "`python -c 'from evalplus.data import get_mbpp_plus; get_mbpp_plus()'` once (EvalPlus downloads it into "
            "~/.cache/evalplus), or point MBPP_OVERRIDE_PATH (or --evalplus_file) at the file, or pass --allow_subset "
            f"to use every task of {source} (the result records a subset)."
        )
    missing = [task_id for task_id in expected if task_id not in by_id]
    if missing:
        raise DataFormatError(
            f"{len(missing)} of the {len(expected)} {dataset} tasks of {task_set} are not in {source} (first: "
            f"{missing[0]}); pass the full test set with --data_file, or --allow_subset to use only the tasks it has "
            "(the result records a subset)."
        )
    extra = len(by_id) - len(expected)
    if extra > 0:
        logger.info("%s: %d tasks outside %s's task set are left out", source, extra, task_set)
    return [by_id[task_id] for task_id in expected], task_set


EVALPLUS_FIELDS = ("task_id", "prompt", "canonical_solution", "entry_point", "base_input", "plus_input", "atol")


def load_evalplus_problems(dataset: str, path: str) -> dict[str, dict]:
    """HumanEval+ / MBPP+ problems keyed by normalised task id (inputs left as stored; the helpers deserialise)."""
    rows = read_jsonl(path)
    try:
        require_fields(rows, EVALPLUS_FIELDS, path)
    except DataFormatError as error:
        raise DataFormatError(
            f"{error} Is {path} an EvalPlus data file (HumanEvalPlus.jsonl / MbppPlus.jsonl)?"
        ) from error
    return {normalise_task_id(dataset, row["task_id"]): row for row in rows}


# The EvalPlus helper (run with `python -I -c`, see sandbox.HelperPool; trusted code only): loads the EvalPlus data
# file itself (so MBPP inputs are deserialised by EvalPlus), runs the canonical solution (trusted code from the data
# file) for the expected outputs and their times, as `evalplus.evaluate.get_groundtruth` does without its pickle
# cache, then checks the solution with EvalPlus's own checker `evalplus.eval.untrusted_check` (per-input time limits
# max(1 s, 4 x the canonical time), its output comparisons and special oracles). The solution itself never runs in
# this process: it is defined in a fresh isolated solver per split (sandbox_judge.open_program), and the code EvalPlus
# executes only binds the entry point to a proxy of it, so outputs are compared here, on plain data. Plus inputs
# only run when the base ones pass.
EVALPLUS_WORKER_SOURCE = r"""
import importlib.util, json, sys, time
from evalplus.config import DEFAULT_GT_TIME_LIMIT_FACTOR, DEFAULT_MIN_TIME_LIMIT
from evalplus.data.utils import stream_jsonl
from evalplus.eval import FAIL, PASS, untrusted_check
from evalplus.eval._special_oracle import MBPP_OUTPUT_NOT_NONE_TASKS
from evalplus.gen.util import trusted_exec

spec = importlib.util.spec_from_file_location("tlora_sandbox_judge", sys.argv[1])
judge = importlib.util.module_from_spec(spec)
sys.modules["tlora_sandbox_judge"] = judge
spec.loader.exec_module(judge)
CONFIG = json.loads(sys.argv[2])
PROBLEMS = {}


def problems(dataset, path):
    if path not in PROBLEMS:
        loaded = {}
        for problem in stream_jsonl(path):
            if dataset == "mbpp":
                from evalplus.data.mbpp import mbpp_deserialize_inputs
                problem["base_input"] = mbpp_deserialize_inputs(problem["task_id"], problem["base_input"])
                problem["plus_input"] = mbpp_deserialize_inputs(problem["task_id"], problem["plus_input"])
            loaded[problem["task_id"]] = problem
        PROBLEMS[path] = loaded
    return PROBLEMS[path]


def sandboxed_check(job, problem, inputs, expected, times):
    entry_point = problem["entry_point"]
    budget = sum(max(DEFAULT_MIN_TIME_LIMIT, DEFAULT_GT_TIME_LIMIT_FACTOR * t) for t in times) + 2
    request = dict(job["limits"], program=job["solution"], timeout_per_test=budget, cpu_seconds=2 * budget)
    try:
        solver, reply = judge.open_program(CONFIG, request, {entry_point}, time.monotonic() + 3 * budget + 10)
    except (judge.WallClockTimeout, judge.SolverGone):
        return FAIL
    try:
        if not reply.get("ok") or reply.get("names", {}).get(entry_point) != "callable":
            return FAIL
        judge.EVALPLUS_TARGET = judge.Calls(solver, budget).proxy(entry_point)
        code = "from tlora_sandbox_judge import EVALPLUS_TARGET as %s\n" % entry_point
        status, _ = untrusted_check(job["dataset"], code, inputs, entry_point, expected=expected,
                                    atol=problem["atol"], ref_time=times, fast_check=True,
                                    min_time_limit=DEFAULT_MIN_TIME_LIMIT,
                                    gt_time_limit_factor=DEFAULT_GT_TIME_LIMIT_FACTOR)
        return status
    finally:
        solver.close()


def check(job):
    dataset = job["dataset"]
    problem = problems(dataset, job["path"])[job["task_id"]]
    output_not_none = dataset == "mbpp" and problem["entry_point"] in MBPP_OUTPUT_NOT_NONE_TASKS
    reference = problem["prompt"] + problem["canonical_solution"]
    statuses = {"base": None, "plus": None}
    for split in ("base", "plus"):
        inputs = problem[split + "_input"]
        expected, times = trusted_exec(reference, inputs, problem["entry_point"], record_time=True,
                                       output_not_none=output_not_none)
        statuses[split] = sandboxed_check(job, problem, inputs, expected, times)
        if statuses[split] != PASS:
            break
    return statuses


for line in sys.stdin:
    if not line.strip():
        continue
    try:
        answer = check(json.loads(line))
    except Exception as error:
        answer = {"base": "error", "plus": None, "error": "evalplus helper: %r" % (error,)}
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()
"""


def run_evalplus(
    dataset: str,
    path: str,
    jobs: Sequence[tuple[str, str]],
    workers: int,
    progress: bool = True,
    limits: Optional[SandboxLimits] = None,
    unsafe_execution: bool = False,
) -> list[dict]:
    """EvalPlus base/plus statuses (`"pass"`, `"fail"`, `"timeout"`) for (raw task_id, solution) pairs."""
    import importlib.util
    import tempfile

    if importlib.util.find_spec("evalplus") is None:
        raise ImportError("Scoring with EvalPlus data needs evalplus: pip install evalplus (the 'eval' extra).")
    limits = limits or SandboxLimits()
    isolation = resolve_isolation(limits, unsafe_execution)
    solver_limits = {
        "memory_mb": limits.memory_mb,
        "max_file_mb": limits.max_file_mb,
        "max_processes": limits.max_processes,
    }
    requests = [
        {
            "dataset": dataset,
            "path": os.path.abspath(path),
            "task_id": task_id,
            "solution": solution,
            "limits": solver_limits,
        }
        for task_id, solution in jobs
    ]
    work_dir = tempfile.mkdtemp(prefix="tlora-evalplus-")
    try:
        program = ["-c", EVALPLUS_WORKER_SOURCE, JUDGE_PATH, helper_config(isolation, work_dir)]
        with HelperPool(program, workers=workers, cwd=work_dir) as pool:
            return pool.map(requests, progress=progress, description=f"evalplus {dataset}")
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def _group_pass_rate(records: Sequence[Mapping], key: str) -> Optional[float]:
    """Mean over tasks of the fraction of a task's samples with `key` true (pass@1 with n samples per task)."""
    by_task: dict[str, list[bool]] = defaultdict(list)
    for record in records:
        if record[key] is None:
            return None
        by_task[record["task_id"]].append(bool(record[key]))
    if not by_task:
        return 0.0
    return sum(sum(values) / len(values) for values in by_task.values()) / len(by_task)


def score_code_predictions(
    dataset: str,
    predictions: Sequence[Mapping],
    tasks: Optional[Sequence[CodeTask]] = None,
    *,
    data_file: Optional[str] = None,
    evalplus_file: Optional[str] = None,
    postprocess: bool = True,
    protocol: str = ROBUST,
    allow_subset: bool = False,
    limits: Optional[SandboxLimits] = None,
    workers: Optional[int] = None,
    progress: bool = True,
    unsafe_execution: bool = False,
) -> dict:
    """pass@1 of `predictions` (rows with task_id and completion) over EvalPlus's task set: the result dict with one
    record per prediction.

    A task of the set without a prediction is an error unless `allow_subset` (then only predicted tasks are scored,
    and the result says so); predictions for tasks outside the test data are an error. Generated code runs isolated
    (`sandbox.py`); where the isolation is not available this raises `SandboxUnavailableError` before any work,
    unless `unsafe_execution` (recorded in the result).
    """
    check_dataset(dataset)
    check_protocol(protocol)
    isolation = resolve_isolation(limits or SandboxLimits(), unsafe_execution)
    data_file = data_file or DEFAULT_DATA_FILES[dataset]
    if tasks is None:
        tasks = load_code_tasks(dataset, data_file)
    workers = workers or default_workers()
    plus_path = evalplus_data_file(dataset, evalplus_file)
    if protocol == PAPER and plus_path is None:
        raise FileNotFoundError(
            f"--protocol paper scores {dataset} with EvalPlus (base and plus tests), as the authors did: point "
            f"{EVALPLUS_ENVIRONMENT[dataset]} (or --evalplus_file) at EvalPlus's data file, or let EvalPlus download "
            "it once (`python -c 'from evalplus.data import get_human_eval_plus, get_mbpp_plus; "
            "get_human_eval_plus(); get_mbpp_plus()'`)."
        )
    plus_problems = load_evalplus_problems(dataset, plus_path) if plus_path else None
    selected, task_set = select_tasks(dataset, tasks, plus_path, source=data_file, allow_subset=allow_subset)
    task_by_id = {task.task_id: task for task in tasks}
    scored_ids = [task.task_id for task in selected]
    if not scored_ids:
        raise DataFormatError(f"No {dataset} task of {task_set} is in {data_file}; check both files.")
    rows = [{**row, "task_id": normalise_task_id(dataset, row["task_id"])} for row in predictions]
    unknown = sorted({row["task_id"] for row in rows} - set(task_by_id))
    if unknown:
        raise DataFormatError(
            f"{len(unknown)} prediction(s) name tasks that are not in the test set (first: {unknown[0]}); check "
            "--data_file and --limit."
        )
    outside = {row["task_id"] for row in rows} - set(scored_ids)
    if outside:
        logger.info("%d predicted tasks are outside %s and are not scored", len(outside), task_set)
    known = set(scored_ids)
    rows = [row for row in rows if row["task_id"] in known]
    predicted = {row["task_id"] for row in rows}
    missing = [task_id for task_id in scored_ids if task_id not in predicted]
    if missing and not allow_subset:
        raise DataFormatError(
            f"{len(missing)} of the {len(scored_ids)} {dataset} tasks have no prediction (first: {missing[0]}); "
            "generate all of them, or pass --allow_subset to score only the predicted tasks (the result records a "
            "subset)."
        )
    if missing:
        logger.warning(
            "--allow_subset: scoring %d of %d tasks (no prediction for the rest)", len(predicted), len(known)
        )
        scored_ids = [task_id for task_id in scored_ids if task_id in predicted]

    clean = postprocess_for(protocol) if postprocess else (lambda text: text)
    records = []
    for row in rows:
        task = task_by_id[row["task_id"]]
        task_prompt = plus_problems[row["task_id"]]["prompt"] if plus_problems is not None else task.text
        completion = clean(row["completion"])
        record = {
            "task_id": row["task_id"],
            "prompt": row.get("prompt") or build_prompt(dataset, task),
            "completion": completion,
            "solution": build_solution(dataset, task_prompt, completion, protocol),
            "passed": False,
            "plus_passed": None,
            "error": None,
        }
        if "raw_completion" in row:
            record["raw_completion"] = row["raw_completion"]
        records.append(record)

    started = time.monotonic()
    if plus_problems is not None:
        jobs = [(plus_problems[r["task_id"]]["task_id"], r["solution"]) for r in records]
        answers = run_evalplus(
            dataset, plus_path, jobs, workers, progress=progress, limits=limits, unsafe_execution=unsafe_execution
        )
        for record, answer in zip(records, answers, strict=True):
            status = {"base": answer.get("base", "error"), "plus": answer.get("plus")}
            record["passed"] = status["base"] == "pass"
            record["plus_passed"] = record["passed"] and status["plus"] == "pass"
            record["status"] = status
            if not record["plus_passed"]:
                failed_split = "base" if not record["passed"] else "plus"
                record["error"] = answer.get("error") or f"{failed_split} tests: {status[failed_split]}"
    else:
        jobs = [
            ProgramJob(
                program=record["solution"],
                tests=task_by_id[record["task_id"]].tests,
                setup=task_by_id[record["task_id"]].setup,
                # HumanEval's prompt (imports, helpers such as `poly`) runs trusted beside the tests
                context=task_by_id[record["task_id"]].text if dataset == "humaneval" else "",
                entry_points=tuple(filter(None, [task_by_id[record["task_id"]].entry_point])),
            )
            for record in records
        ]
        outcomes = run_programs(jobs, limits, workers, progress=progress, unsafe_execution=unsafe_execution)
        for record, outcome in zip(records, outcomes, strict=True):
            record["passed"] = outcome.passed
            record["status"] = outcome.status
            record["error"] = outcome.error
    seconds = time.monotonic() - started

    pass_at_1 = _group_pass_rate(records, "passed")
    pass_at_1_plus = _group_pass_rate(records, "plus_passed") if plus_problems is not None else None
    logger.info(
        "%s pass@1 %.4f%s over %d tasks (%.1f s of testing)",
        dataset,
        pass_at_1,
        "" if pass_at_1_plus is None else f", plus {pass_at_1_plus:.4f}",
        len(scored_ids),
        seconds,
    )
    return {
        "task": dataset,
        "pass@1": pass_at_1,
        "pass@1_plus": pass_at_1_plus,
        "num_items": len(scored_ids),
        "num_predictions": len(rows),
        "num_passed": sum(bool(record["passed"]) for record in records),
        "protocol": protocol,
        "data": data_record(data_file, len(scored_ids), dataset, subset=allow_subset),
        "task_set": task_set,
        # `pass@1` counts the base tests (EvalPlus's or the original asserts); `pass@1_plus` base and plus.
        "tests": "evalplus base+plus" if plus_problems is not None else "original asserts",
        "evalplus_file": plus_path,
        "data_file": data_file,
        "postprocessed": postprocess,
        "scoring_seconds": round(seconds, 2),
        "unsafe_execution": isolation.unsafe,
        "sandbox": isolation.description,
        "records": records,
    }


# ----------------------------------------------------------------------------------------------------------------
# End to end (what the entry scripts call)


def write_json(path: str, data: Mapping) -> None:
    """Write `data` as indented UTF-8 JSON, creating the folder."""
    import json

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, ensure_ascii=False)
        handle.write("\n")


def tasks_to_generate(
    dataset: str,
    data_file: Optional[str],
    *,
    limit: Optional[int] = None,
    evalplus_file: Optional[str] = None,
    allow_subset: bool = False,
) -> list[CodeTask]:
    """EvalPlus's task set of `dataset` from `data_file`, checked complete unless a subset is asked for (`--limit`
    or `allow_subset`)."""
    source = data_file or DEFAULT_DATA_FILES[dataset]
    tasks = load_code_tasks(dataset, source, limit=limit)
    selected, _ = select_tasks(
        dataset,
        tasks,
        evalplus_data_file(dataset, evalplus_file),
        source=source,
        allow_subset=allow_subset or limit is not None,
    )
    return selected


def generate_code_file(
    dataset: str,
    backend,
    output_path: str,
    *,
    data_file: Optional[str] = None,
    settings=None,
    limit: Optional[int] = None,
    evalplus_file: Optional[str] = None,
    allow_subset: bool = False,
    protocol: str = ROBUST,
    tasks: Optional[Sequence[CodeTask]] = None,
) -> list[dict]:
    """Generate completions for EvalPlus's task set of `dataset` (or for `tasks`, from `tasks_to_generate`) and write
    them as a predictions file (JSON lines)."""
    from .common import write_jsonl

    if tasks is None:
        tasks = tasks_to_generate(
            dataset, data_file, limit=limit, evalplus_file=evalplus_file, allow_subset=allow_subset
        )
    settings = settings or generation_settings(protocol=protocol)
    rows = generate_code_predictions(dataset, tasks, backend, settings, protocol)
    write_jsonl(output_path, rows)
    logger.info("Wrote %d %s generations to %s", len(rows), dataset, output_path)
    return rows


def evaluate_code(
    dataset: str,
    *,
    predictions_file: Optional[str] = None,
    backend=None,
    data_file: Optional[str] = None,
    output: Optional[str] = None,
    evalplus_file: Optional[str] = None,
    settings=None,
    limit: Optional[int] = None,
    postprocess: bool = True,
    protocol: str = ROBUST,
    allow_subset: bool = False,
    limits: Optional[SandboxLimits] = None,
    workers: Optional[int] = None,
    score_references: bool = False,
    extra: Optional[Mapping] = None,
    unsafe_execution: bool = False,
) -> dict:
    """Score `predictions_file` (or generate with `backend` first, or the references) and write the result JSON."""
    from dataclasses import asdict

    from .common import predictions_path, write_jsonl

    source = data_file or DEFAULT_DATA_FILES[dataset]
    tasks = load_code_tasks(dataset, source, limit=limit)
    subset = allow_subset or limit is not None
    info: dict[str, Any] = {}
    if score_references:
        predictions, postprocess = reference_predictions(dataset, tasks), False
        info["predictions"] = "reference solutions"
    elif predictions_file is not None:
        known = [task.task_id for task in tasks]
        described = source if limit is None else f"the first {limit} tasks of {source} (--limit)"
        predictions = read_code_predictions(predictions_file, dataset, known, data=described)
        info["predictions_file"] = predictions_file
    elif backend is not None:
        settings = settings or generation_settings(protocol=protocol)
        selected, _ = select_tasks(
            dataset, tasks, evalplus_data_file(dataset, evalplus_file), source=source, allow_subset=subset
        )
        predictions = generate_code_predictions(dataset, selected, backend, settings, protocol)
        info["generation"] = asdict(settings)
        if output is not None:
            write_jsonl(predictions_path(output), predictions)
    else:
        raise ValueError("Pass --predictions FILE to score existing generations, or --model PATH to generate them.")
    result = score_code_predictions(
        dataset,
        predictions,
        tasks,
        data_file=source,
        evalplus_file=evalplus_file,
        postprocess=postprocess,
        protocol=protocol,
        allow_subset=subset,
        limits=limits,
        workers=workers,
        unsafe_execution=unsafe_execution,
    )
    if limit is not None:
        result["limit"] = limit
    result.update(info)
    result.update(extra or {})
    result["records"] = result.pop("records")  # keep the records last
    if output is not None:
        write_json(output, result)
        logger.info("Wrote %s (pass@1 %.4f)", output, result["pass@1"])
    return result


__all__ = [
    "DATASETS",
    "DEFAULT_DATA_FILES",
    "HUMANEVAL_INSTRUCTION",
    "MAX_NEW_TOKENS",
    "MBPP_INSTRUCTION",
    "CodeTask",
    "build_instruction",
    "build_prompt",
    "build_solution",
    "run_evalplus",
    "evalplus_cache_file",
    "evalplus_data_file",
    "expected_task_ids",
    "paper_postprocess_completion",
    "postprocess_for",
    "select_tasks",
    "tasks_to_generate",
    "evaluate_code",
    "generate_code_file",
    "extract_code_block",
    "generate_code_predictions",
    "generation_settings",
    "load_code_tasks",
    "load_evalplus_problems",
    "normalise_task_id",
    "postprocess_completion",
    "read_code_predictions",
    "reference_predictions",
    "score_code_predictions",
    "strip_trailing_examples",
]
