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

Scoring: with EvalPlus's data (HumanEval+ / MBPP+ files named by `HUMANEVAL_OVERRIDE_PATH` / `MBPP_OVERRIDE_PATH`
or `--evalplus_file`) each solution runs in EvalPlus's own sandbox (`evalplus.eval.untrusted_check`) on the base and
the plus inputs and is compared with the canonical solution's outputs, as `evalplus.evaluate` does: `pass@1` is the
base score and `pass@1_plus` the base+plus score, over the EvalPlus task set (164 HumanEval, 378 MBPP tasks).
Without that data the original tests (HumanEval's `check`, MBPP's `test_list` assertions) run in this package's
sandbox (`sandbox.py`: a forked child per program with memory, CPU, per-test and wall-clock limits); `pass@1_plus`
is then null and MBPP counts all 427 sanitized tasks. Generated code never runs in the scorer's process.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from ..prompts import format_prompt
from .common import DataFormatError, load_rows, read_jsonl, require_fields
from .sandbox import HelperPool, ProgramJob, SandboxLimits, default_workers, run_programs

logger = logging.getLogger(__name__)

DATASETS = ("humaneval", "mbpp")

# Default test sets: hub ids (the files in ../shared/data use the same formats).
HUMANEVAL_HUB_ID = "openai/openai_humaneval"
MBPP_HUB_ID = "google-research-datasets/mbpp"
MBPP_HUB_CONFIG = "sanitized"
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
        rows = load_rows(source, hub_config=MBPP_HUB_CONFIG, hub_split="test")
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


def build_solution(dataset: str, task_prompt: str, completion: str) -> str:
    """The program that is run: `prompt + completion` for HumanEval, the completion itself for MBPP."""
    return task_prompt + completion if dataset == "humaneval" else completion


# ----------------------------------------------------------------------------------------------------------------
# Generation


def generation_settings(max_new_tokens: Optional[int] = None, batch_size: int = 16, seed: int = 0):
    """Greedy decoding with the paper's code limit and the Alpaca stop strings."""
    from .generation import DEFAULT_STOP_STRINGS, GenerationSettings

    return GenerationSettings(
        max_new_tokens=max_new_tokens or MAX_NEW_TOKENS,
        temperature=0.0,
        top_p=1.0,
        stop=list(DEFAULT_STOP_STRINGS),
        batch_size=batch_size,
        seed=seed,
    )


def generate_code_predictions(dataset: str, tasks: Sequence[CodeTask], backend, settings) -> list[dict]:
    """One predictions row per task: task_id, model prompt, raw completion and post-processed completion."""
    prompts = [build_prompt(dataset, task) for task in tasks]
    started = time.monotonic()
    texts = backend.generate(prompts, settings)
    logger.info("Generated %d %s completions in %.1f s", len(texts), dataset, time.monotonic() - started)
    return [
        {
            "task_id": task.task_id,
            "prompt": prompt,
            "raw_completion": text,
            "completion": postprocess_completion(text),
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


def read_code_predictions(path: str, dataset: str) -> list[dict]:
    """The rows of a code predictions file (`{"task_id", "completion"}` and optionally `raw_completion`, `prompt`)."""
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
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Scoring


def evalplus_data_file(dataset: str, explicit: Optional[str] = None) -> Optional[str]:
    """The EvalPlus data file to use: `explicit`, else the variable EvalPlus reads, else None (original tests)."""
    path = explicit or os.environ.get(EVALPLUS_ENVIRONMENT[dataset])
    if path and not os.path.isfile(os.path.expanduser(path)):
        raise FileNotFoundError(
            f"EvalPlus data file {path} does not exist; download HumanEvalPlus.jsonl / MbppPlus.jsonl from the "
            f"EvalPlus releases and point {EVALPLUS_ENVIRONMENT[dataset]} (or --evalplus_file) at it, or unset it "
            "to score with the original tests."
        )
    return os.path.expanduser(path) if path else None


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


# The EvalPlus helper (run with `python -I -c`, see sandbox.HelperPool): loads the EvalPlus data file itself (so MBPP
# inputs are deserialised by EvalPlus), runs the canonical solution (trusted code from the data file) for the
# expected outputs and their times, as `evalplus.evaluate.get_groundtruth` does without its pickle cache, then checks
# the solution with `evalplus.eval.untrusted_check`: a forked child with EvalPlus's memory limit, per-input time
# limits (max(1 s, 4 x the canonical time)) and disabled functions. Plus inputs only run when the base ones pass.
EVALPLUS_WORKER_SOURCE = r"""
import json, sys
from evalplus.config import DEFAULT_GT_TIME_LIMIT_FACTOR, DEFAULT_MIN_TIME_LIMIT
from evalplus.data.utils import stream_jsonl
from evalplus.eval import PASS, untrusted_check
from evalplus.eval._special_oracle import MBPP_OUTPUT_NOT_NONE_TASKS
from evalplus.gen.util import trusted_exec

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
        status, _ = untrusted_check(dataset, job["solution"], inputs, problem["entry_point"], expected=expected,
                                    atol=problem["atol"], ref_time=times, fast_check=True,
                                    min_time_limit=DEFAULT_MIN_TIME_LIMIT,
                                    gt_time_limit_factor=DEFAULT_GT_TIME_LIMIT_FACTOR)
        statuses[split] = status
        if status != PASS:
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
    dataset: str, path: str, jobs: Sequence[tuple[str, str]], workers: int, progress: bool = True
) -> list[dict]:
    """EvalPlus base/plus statuses (`"pass"`, `"fail"`, `"timeout"`) for (raw task_id, solution) pairs."""
    import importlib.util

    if importlib.util.find_spec("evalplus") is None:
        raise ImportError("Scoring with EvalPlus data needs evalplus: pip install evalplus (the 'eval' extra).")
    requests = [
        {"dataset": dataset, "path": os.path.abspath(path), "task_id": task_id, "solution": solution}
        for task_id, solution in jobs
    ]
    with HelperPool(EVALPLUS_WORKER_SOURCE, workers=workers) as pool:
        return pool.map(requests, progress=progress, description=f"evalplus {dataset}")


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
    limits: Optional[SandboxLimits] = None,
    workers: Optional[int] = None,
    progress: bool = True,
) -> dict:
    """pass@1 of `predictions` (rows with task_id and completion): the result dict with one record per prediction.

    Tasks without a prediction count as failed (and are reported); predictions for unknown tasks are an error.
    """
    check_dataset(dataset)
    if tasks is None:
        data_file = data_file or DEFAULT_DATA_FILES[dataset]
        tasks = load_code_tasks(dataset, data_file)
    workers = workers or default_workers()
    plus_path = evalplus_data_file(dataset, evalplus_file)
    plus_problems = load_evalplus_problems(dataset, plus_path) if plus_path else None
    task_by_id = {task.task_id: task for task in tasks}
    if plus_problems is not None:
        # EvalPlus's set (HumanEval+ 164, MBPP+ 378 of the 427 sanitized tasks) within the tasks asked for.
        scored_ids = [task_id for task_id in plus_problems if task_id in task_by_id]
        if not scored_ids:
            raise DataFormatError(
                f"The EvalPlus file {plus_path} and the {dataset} test set share no task ids; check both files."
            )
    else:
        scored_ids = [task.task_id for task in tasks]
    rows = [{**row, "task_id": normalise_task_id(dataset, row["task_id"])} for row in predictions]
    known = set(scored_ids)
    unknown = sorted({row["task_id"] for row in rows} - known)
    if unknown and plus_problems is None:
        raise DataFormatError(
            f"{len(unknown)} prediction(s) name tasks that are not in the test set (first: {unknown[0]}); check "
            "--data_file and --limit."
        )
    if unknown:
        logger.info("%d predictions are for tasks outside the EvalPlus set and are not scored", len(unknown))
    rows = [row for row in rows if row["task_id"] in known]
    predicted = {row["task_id"] for row in rows}
    missing = [task_id for task_id in scored_ids if task_id not in predicted]
    if missing:
        logger.warning(
            "%d of %d tasks have no prediction and count as failed (first: %s)",
            len(missing),
            len(scored_ids),
            missing[0],
        )

    records = []
    for row in rows:
        task = task_by_id.get(row["task_id"])
        if plus_problems is not None:
            task_prompt = plus_problems[row["task_id"]]["prompt"]
        else:
            task_prompt = task.text
        completion = postprocess_completion(row["completion"]) if postprocess else row["completion"]
        record = {
            "task_id": row["task_id"],
            "prompt": row.get("prompt") or (build_prompt(dataset, task) if task is not None else task_prompt),
            "completion": completion,
            "solution": build_solution(dataset, task_prompt, completion),
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
        answers = run_evalplus(dataset, plus_path, jobs, workers, progress=progress)
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
            )
            for record in records
        ]
        for record, outcome in zip(records, run_programs(jobs, limits, workers, progress=progress), strict=True):
            record["passed"] = outcome.passed
            record["status"] = outcome.status
            record["error"] = outcome.error
    seconds = time.monotonic() - started
    for task_id in missing:
        records.append(
            {
                "task_id": task_id,
                "prompt": None,
                "completion": None,
                "solution": None,
                "passed": False,
                "plus_passed": False if plus_problems is not None else None,
                "error": "no prediction",
                "status": "missing",
            }
        )

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
        "num_missing": len(missing),
        "tests": "evalplus" if plus_problems is not None else "original",
        "evalplus_file": plus_path,
        "data_file": data_file,
        "postprocessed": postprocess,
        "scoring_seconds": round(seconds, 2),
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


def generate_code_file(
    dataset: str,
    backend,
    output_path: str,
    *,
    data_file: Optional[str] = None,
    settings=None,
    limit: Optional[int] = None,
) -> list[dict]:
    """Generate completions for every task of `dataset` and write them as a predictions file (JSON lines)."""
    from .common import write_jsonl

    tasks = load_code_tasks(dataset, data_file, limit=limit)
    rows = generate_code_predictions(dataset, tasks, backend, settings or generation_settings())
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
    limits: Optional[SandboxLimits] = None,
    workers: Optional[int] = None,
    score_references: bool = False,
    extra: Optional[Mapping] = None,
) -> dict:
    """Score `predictions_file` (or generate with `backend` first, or the references) and write the result JSON."""
    from dataclasses import asdict

    from .common import predictions_path, write_jsonl

    source = data_file or DEFAULT_DATA_FILES[dataset]
    tasks = load_code_tasks(dataset, source, limit=limit)
    info: dict[str, Any] = {}
    if score_references:
        predictions, postprocess = reference_predictions(dataset, tasks), False
        info["predictions"] = "reference solutions"
    elif predictions_file is not None:
        predictions = read_code_predictions(predictions_file, dataset)
        info["predictions_file"] = predictions_file
    elif backend is not None:
        settings = settings or generation_settings()
        predictions = generate_code_predictions(dataset, tasks, backend, settings)
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
        limits=limits,
        workers=workers,
    )
    result["data_file"] = source
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
    "evalplus_data_file",
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
