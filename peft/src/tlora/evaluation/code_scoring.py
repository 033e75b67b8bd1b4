"""Code scoring: pass@1 of predictions, by EvalPlus's checker or the original tests, always in the sandbox.

With EvalPlus's data (HumanEval+ / MBPP+ files named by `HUMANEVAL_OVERRIDE_PATH` / `MBPP_OVERRIDE_PATH` or
`--evalplus_file`) each solution is checked by EvalPlus's own checker (`evalplus.eval.untrusted_check`, run by
`evalplus_judge.py`) on the base and the plus inputs and compared with the canonical solution's outputs, as
`evalplus.evaluate` does: `pass@1` is the base score and `pass@1_plus` the base+plus score, over the EvalPlus task set
(164 HumanEval, 378 MBPP tasks). Without that data the original tests (HumanEval's `check`, MBPP's `test_list`
assertions) run in this package's sandbox (`sandbox.py`); `pass@1_plus` is then null and MBPP counts all 427
sanitized tasks. Either way the tests run in a trusted judge and the solution in an isolated solver (bubblewrap
namespaces, uid 65534, memory, CPU, per-test and wall-clock limits) that only answers calls, so a solution cannot
write its own verdict (see `sandbox.py`); where the isolation is missing, scoring stops unless `unsafe_execution`,
which the result records.

The steps: `plan_scoring` (task set, EvalPlus data, isolation), `select_predictions`, `build_records`, `run_tests`,
`code_metrics`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from .code_cleanup import build_prompt, build_solution, code_protocol, postprocess_for
from .code_data import (
    EVALPLUS_ENVIRONMENT,
    CodeTask,
    evalplus_data_file,
    load_evalplus_problems,
    normalise_task_id,
    select_tasks,
)
from .common import DataFormatError
from .sandbox import (
    EVALPLUS_JUDGE_PATH,
    HelperPool,
    Isolation,
    ProgramJob,
    SandboxLimits,
    helper_config,
    resolve_isolation,
    run_programs,
)

logger = logging.getLogger(__name__)


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
        program = [EVALPLUS_JUDGE_PATH, helper_config(isolation, work_dir)]
        with HelperPool(program, workers=workers, cwd=work_dir) as pool:
            return pool.map(requests, progress=progress, description=f"evalplus {dataset}")
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def group_pass_rate(records: Sequence[Mapping], key: str) -> Optional[float]:
    """Mean over tasks of the fraction of a task's samples with `key` true (pass@1 with n samples per task)."""
    by_task: dict[str, list[bool]] = defaultdict(list)
    for record in records:
        if record[key] is None:
            return None
        by_task[record["task_id"]].append(bool(record[key]))
    if not by_task:
        return 0.0
    return sum(sum(values) / len(values) for values in by_task.values()) / len(by_task)


@dataclass
class ScoringPlan:
    """What a scoring run checks: the task set, its tasks, the EvalPlus data (if any) and the isolation."""

    dataset: str
    protocol: str
    data_file: str
    task_by_id: dict[str, CodeTask]
    scored_ids: list[str]
    task_set: str
    plus_path: Optional[str]
    plus_problems: Optional[dict[str, dict]]
    isolation: Isolation
    allow_subset: bool


def plan_scoring(
    dataset: str,
    tasks: Sequence[CodeTask],
    *,
    data_file: str,
    evalplus_file: Optional[str],
    protocol: str,
    allow_subset: bool,
    isolation: Isolation,
) -> ScoringPlan:
    """The task set to score and its EvalPlus data; the paper protocol needs EvalPlus's data file."""
    plus_path = evalplus_data_file(dataset, evalplus_file)
    if code_protocol(protocol).needs_evalplus and plus_path is None:
        raise FileNotFoundError(
            f"--protocol paper scores {dataset} with EvalPlus (base and plus tests), as the authors did: point "
            f"{EVALPLUS_ENVIRONMENT[dataset]} (or --evalplus_file) at EvalPlus's data file, or let EvalPlus download "
            "it once (`python -c 'from evalplus.data import get_human_eval_plus, get_mbpp_plus; "
            "get_human_eval_plus(); get_mbpp_plus()'`)."
        )
    plus_problems = load_evalplus_problems(dataset, plus_path) if plus_path else None
    selected, task_set = select_tasks(dataset, tasks, plus_path, source=data_file, allow_subset=allow_subset)
    scored_ids = [task.task_id for task in selected]
    if not scored_ids:
        raise DataFormatError(f"No {dataset} task of {task_set} is in {data_file}; check both files.")
    task_by_id = {task.task_id: task for task in tasks}
    return ScoringPlan(
        dataset,
        protocol,
        data_file,
        task_by_id,
        scored_ids,
        task_set,
        plus_path,
        plus_problems,
        isolation,
        allow_subset,
    )


def select_predictions(plan: ScoringPlan, predictions: Sequence[Mapping]) -> list[dict]:
    """The predictions of the task set (ids normalised); a prediction outside the test data is an error, and so is a
    task without one unless a subset is allowed (then `plan.scored_ids` keeps only the predicted tasks)."""
    rows = [{**row, "task_id": normalise_task_id(plan.dataset, row["task_id"])} for row in predictions]
    unknown = sorted({row["task_id"] for row in rows} - set(plan.task_by_id))
    if unknown:
        raise DataFormatError(
            f"{len(unknown)} prediction(s) name tasks that are not in the test set (first: {unknown[0]}); check "
            "--data_file and --limit."
        )
    known = set(plan.scored_ids)
    outside = {row["task_id"] for row in rows} - known
    if outside:
        logger.info("%d predicted tasks are outside %s and are not scored", len(outside), plan.task_set)
    rows = [row for row in rows if row["task_id"] in known]
    predicted = {row["task_id"] for row in rows}
    missing = [task_id for task_id in plan.scored_ids if task_id not in predicted]
    if missing and not plan.allow_subset:
        raise DataFormatError(
            f"{len(missing)} of the {len(plan.scored_ids)} {plan.dataset} tasks have no prediction (first: "
            f"{missing[0]}); generate all of them, or pass --allow_subset to score only the predicted tasks (the "
            "result records a subset)."
        )
    if missing:
        logger.warning(
            "--allow_subset: scoring %d of %d tasks (no prediction for the rest)", len(predicted), len(known)
        )
        plan.scored_ids = [task_id for task_id in plan.scored_ids if task_id in predicted]
    return rows


def build_records(plan: ScoringPlan, rows: Sequence[Mapping], postprocess: bool) -> list[dict]:
    """One record per prediction: the cleaned completion and the program that is run (not yet tested)."""
    clean = postprocess_for(plan.protocol) if postprocess else (lambda text: text)
    records = []
    for row in rows:
        task = plan.task_by_id[row["task_id"]]
        task_prompt = plan.plus_problems[row["task_id"]]["prompt"] if plan.plus_problems is not None else task.text
        completion = clean(row["completion"])
        record = {
            "task_id": row["task_id"],
            "prompt": row.get("prompt") or build_prompt(plan.dataset, task),
            "completion": completion,
            "solution": build_solution(plan.dataset, task_prompt, completion, plan.protocol),
            "passed": False,
            "plus_passed": None,
            "error": None,
        }
        if "raw_completion" in row:
            record["raw_completion"] = row["raw_completion"]
        records.append(record)
    return records


def record_evalplus_answers(records: Sequence[dict], answers: Sequence[Mapping]) -> None:
    """Write EvalPlus's base/plus statuses into the records."""
    for record, answer in zip(records, answers, strict=True):
        status = {"base": answer.get("base", "error"), "plus": answer.get("plus")}
        record["passed"] = status["base"] == "pass"
        record["plus_passed"] = record["passed"] and status["plus"] == "pass"
        record["status"] = status
        if not record["plus_passed"]:
            failed_split = "base" if not record["passed"] else "plus"
            record["error"] = answer.get("error") or f"{failed_split} tests: {status[failed_split]}"


def original_test_jobs(plan: ScoringPlan, records: Sequence[Mapping]) -> list[ProgramJob]:
    """Sandbox jobs running each record's program against its task's original tests."""
    jobs = []
    for record in records:
        task = plan.task_by_id[record["task_id"]]
        jobs.append(
            ProgramJob(
                program=record["solution"],
                tests=task.tests,
                setup=task.setup,
                # HumanEval's prompt (imports, helpers such as `poly`) runs trusted beside the tests
                context=task.text if plan.dataset == "humaneval" else "",
                entry_points=tuple(filter(None, [task.entry_point])),
            )
        )
    return jobs


def run_tests(
    plan: ScoringPlan,
    records: Sequence[dict],
    *,
    limits: Optional[SandboxLimits],
    workers: int,
    progress: bool,
    unsafe_execution: bool,
) -> float:
    """Test every record (EvalPlus's checker when its data is at hand, else the original tests), filling in
    `passed`, `plus_passed`, `status` and `error`; returns the seconds spent."""
    started = time.monotonic()
    if plan.plus_problems is not None:
        jobs = [(plan.plus_problems[r["task_id"]]["task_id"], r["solution"]) for r in records]
        answers = run_evalplus(
            plan.dataset, plan.plus_path, jobs, workers, progress, limits=limits, unsafe_execution=unsafe_execution
        )
        record_evalplus_answers(records, answers)
    else:
        jobs = original_test_jobs(plan, records)
        outcomes = run_programs(jobs, limits, workers, progress=progress, unsafe_execution=unsafe_execution)
        for record, outcome in zip(records, outcomes, strict=True):
            record["passed"] = outcome.passed
            record["status"] = outcome.status
            record["error"] = outcome.error
    return time.monotonic() - started


def code_metrics(
    plan: ScoringPlan, records: Sequence[Mapping], num_predictions: int, seconds: float, *, postprocess: bool
) -> dict[str, Any]:
    """pass@1 (base tests), pass@1_plus (base and plus, with EvalPlus data) and the scoring's provenance."""
    pass_at_1 = group_pass_rate(records, "passed")
    pass_at_1_plus = group_pass_rate(records, "plus_passed") if plan.plus_problems is not None else None
    logger.info(
        "%s pass@1 %.4f%s over %d tasks (%.1f s of testing)",
        plan.dataset,
        pass_at_1,
        "" if pass_at_1_plus is None else f", plus {pass_at_1_plus:.4f}",
        len(plan.scored_ids),
        seconds,
    )
    return {
        "pass@1": pass_at_1,
        "pass@1_plus": pass_at_1_plus,
        "num_predictions": num_predictions,
        "num_passed": sum(bool(record["passed"]) for record in records),
        "task_set": plan.task_set,
        # `pass@1` counts the base tests (EvalPlus's or the original asserts); `pass@1_plus` base and plus.
        "tests": "evalplus base+plus" if plan.plus_problems is not None else "original asserts",
        "evalplus_file": plan.plus_path,
        "data_file": plan.data_file,
        "postprocessed": postprocess,
        "scoring_seconds": round(seconds, 2),
        "unsafe_execution": plan.isolation.unsafe,
        "sandbox": plan.isolation.description,
    }


__all__ = [
    "ScoringPlan",
    "build_records",
    "code_metrics",
    "group_pass_rate",
    "original_test_jobs",
    "plan_scoring",
    "record_evalplus_answers",
    "run_evalplus",
    "run_tests",
    "select_predictions",
]
