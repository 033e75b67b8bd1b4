"""Code task data: HumanEval and sanitized-MBPP problems, EvalPlus's task sets and data files, predictions files.

Task sets: EvalPlus's task ids (HumanEval+: the 164 HumanEval tasks; MBPP+ v0.2.0: 378 of the 427 sanitized
tasks), read from EvalPlus's data file (`--evalplus_file`, else `HUMANEVAL_OVERRIDE_PATH` / `MBPP_OVERRIDE_PATH`,
else the file EvalPlus cached in `~/.cache/evalplus`). Generation and scoring fail, naming the first missing task,
when the test data or the predictions lack any of them, unless `--allow_subset` (or `--limit`) asks for a subset,
which the result records (`data.subset`). The default MBPP source is all four splits of the hub's sanitized MBPP
(427 tasks; its `test` split alone holds only 257).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from .common import DataFormatError, check_prediction_ids, load_rows, read_jsonl, require_fields

logger = logging.getLogger(__name__)

DATASETS = ("humaneval", "mbpp")

# Default test sets: hub ids (the files in ../shared/data use the same formats).
HUMANEVAL_HUB_ID = "openai/openai_humaneval"
MBPP_HUB_ID = "google-research-datasets/mbpp"
MBPP_HUB_CONFIG = "sanitized"
MBPP_HUB_SPLITS = "prompt+train+validation+test"  # all 427 sanitized tasks (the test split alone has 257)
HUMANEVAL_TASK_COUNT = 164  # HumanEval+ keeps every HumanEval task
# The task sets as the authors scored them: HumanEval+ and MBPP+ v0.2.0 as EvalPlus 0.3.1 loads them.
FULL_SET_SIZES = {"humaneval": HUMANEVAL_TASK_COUNT, "mbpp": 378}
DEFAULT_DATA_FILES = {"humaneval": HUMANEVAL_HUB_ID, "mbpp": MBPP_HUB_ID}

# EvalPlus data (HumanEval+ / MBPP+ JSON lines), read from the same variables EvalPlus itself reads.
EVALPLUS_ENVIRONMENT = {"humaneval": "HUMANEVAL_OVERRIDE_PATH", "mbpp": "MBPP_OVERRIDE_PATH"}


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
# EvalPlus task sets


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


__all__ = [
    "DATASETS",
    "DEFAULT_DATA_FILES",
    "EVALPLUS_ENVIRONMENT",
    "FULL_SET_SIZES",
    "CodeTask",
    "check_dataset",
    "evalplus_cache_file",
    "evalplus_data_file",
    "expected_task_ids",
    "load_code_tasks",
    "load_evalplus_problems",
    "mbpp_entry_point",
    "normalise_task_id",
    "read_code_predictions",
    "reference_predictions",
    "select_tasks",
    "tasks_to_generate",
]
