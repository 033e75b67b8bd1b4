"""The EvalPlus judge: checks solutions on HumanEval+ / MBPP+ base and plus inputs with EvalPlus's own checker.

Run by `code_scoring.run_evalplus` as helper processes (`python -I evalplus_judge.py CONFIG`, see
`sandbox.HelperPool`; trusted code only), one job a line on stdin, one JSON answer a line on stdout. It loads the
EvalPlus data file itself (so MBPP inputs are deserialised by EvalPlus), runs the canonical solution (trusted code
from the data file) for the expected outputs and their times, as `evalplus.evaluate.get_groundtruth` does without
its pickle cache, then checks the solution with `evalplus.eval.untrusted_check` (per-input time limits
max(1 s, 4 x the canonical time), its output comparisons and special oracles). The solution itself never runs in
this process: it is defined in a fresh isolated solver per split (`sandbox_judge.open_program`), and the code
EvalPlus executes only binds the entry point to a proxy of it, so outputs are compared here, on plain data. Plus
inputs only run when the base ones pass.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from evalplus.config import DEFAULT_GT_TIME_LIMIT_FACTOR, DEFAULT_MIN_TIME_LIMIT
from evalplus.data.utils import stream_jsonl
from evalplus.eval import FAIL, PASS, untrusted_check
from evalplus.eval._special_oracle import MBPP_OUTPUT_NOT_NONE_TASKS
from evalplus.gen.util import trusted_exec

if __package__:
    from . import sandbox_judge as judge
else:  # run by path with `python -I`: the sandbox judge sits next to this file
    import importlib.util

    _spec = importlib.util.spec_from_file_location(
        "tlora_sandbox_judge", os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_judge.py")
    )
    judge = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(judge)

# The code EvalPlus runs imports the proxy of the entry point from here, under this name.
JUDGE_MODULE = "tlora_sandbox_judge"
sys.modules.setdefault(JUDGE_MODULE, judge)
PATH = os.path.abspath(__file__)
_PROBLEMS: dict[str, dict[str, dict]] = {}


def problems(dataset: str, path: str) -> dict[str, dict]:
    """The problems of an EvalPlus data file by raw task id (MBPP inputs deserialised by EvalPlus), cached."""
    if path not in _PROBLEMS:
        loaded = {}
        for problem in stream_jsonl(path):
            if dataset == "mbpp":
                from evalplus.data.mbpp import mbpp_deserialize_inputs

                problem["base_input"] = mbpp_deserialize_inputs(problem["task_id"], problem["base_input"])
                problem["plus_input"] = mbpp_deserialize_inputs(problem["task_id"], problem["plus_input"])
            loaded[problem["task_id"]] = problem
        _PROBLEMS[path] = loaded
    return _PROBLEMS[path]


def sandboxed_check(config: dict, job: dict, problem: dict, inputs: list, expected: list, times: list) -> str:
    """EvalPlus's status of the solution on `inputs`, the solution running in an isolated solver."""
    entry_point = problem["entry_point"]
    budget = sum(max(DEFAULT_MIN_TIME_LIMIT, DEFAULT_GT_TIME_LIMIT_FACTOR * t) for t in times) + 2
    request = dict(job["limits"], program=job["solution"], timeout_per_test=budget, cpu_seconds=2 * budget)
    try:
        solver, reply = judge.open_program(config, request, {entry_point}, time.monotonic() + 3 * budget + 10)
    except (judge.WallClockTimeout, judge.SolverGone):
        return FAIL
    try:
        if not reply.get("ok") or reply.get("names", {}).get(entry_point) != "callable":
            return FAIL
        judge.EVALPLUS_TARGET = judge.Calls(solver, budget).proxy(entry_point)
        code = f"from {JUDGE_MODULE} import EVALPLUS_TARGET as {entry_point}\n"
        status, _ = untrusted_check(
            job["dataset"],
            code,
            inputs,
            entry_point,
            expected=expected,
            atol=problem["atol"],
            ref_time=times,
            fast_check=True,
            min_time_limit=DEFAULT_MIN_TIME_LIMIT,
            gt_time_limit_factor=DEFAULT_GT_TIME_LIMIT_FACTOR,
        )
        return status
    finally:
        solver.close()


def check(config: dict, job: dict) -> dict[str, Any]:
    """The base and plus statuses of one job (plus only when base passes)."""
    dataset = job["dataset"]
    problem = problems(dataset, job["path"])[job["task_id"]]
    output_not_none = dataset == "mbpp" and problem["entry_point"] in MBPP_OUTPUT_NOT_NONE_TASKS
    reference = problem["prompt"] + problem["canonical_solution"]
    statuses: dict[str, Any] = {"base": None, "plus": None}
    for split in ("base", "plus"):
        inputs = problem[split + "_input"]
        expected, times = trusted_exec(
            reference, inputs, problem["entry_point"], record_time=True, output_not_none=output_not_none
        )
        statuses[split] = sandboxed_check(config, job, problem, inputs, expected, times)
        if statuses[split] != PASS:
            break
    return statuses


def main(config: dict) -> None:
    """Answer one JSON line on stdout for each job line on stdin (an error answer when a job fails)."""
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            answer = check(config, json.loads(line))
        except Exception as error:  # noqa: BLE001 - reported to the scorer as this job's error
            answer = {"base": "error", "plus": None, "error": f"evalplus helper: {error!r}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
