"""The harness on the real test sets: every reference solution passes, wrong bodies pass nothing (slow: ~1 min)."""

from __future__ import annotations

import pytest
from tlora.evaluation.code import score_code_predictions
from tlora.evaluation.code_data import load_code_tasks, reference_predictions


@pytest.fixture(scope="module")
def humaneval(shared_data):
    """The 164 HumanEval problems from ../shared/data."""
    return load_code_tasks("humaneval", str(shared_data / "humaneval" / "HumanEval.jsonl.gz"))


@pytest.fixture(scope="module")
def mbpp(shared_data):
    """The 427 sanitized MBPP problems from ../shared/data."""
    return load_code_tasks("mbpp", str(shared_data / "mbpp" / "sanitized-mbpp.json"))


@pytest.mark.slow
def test_humaneval_canonical_solutions_pass_164_of_164(humaneval):
    result = score_code_predictions(
        "humaneval", reference_predictions("humaneval", humaneval), humaneval, postprocess=True, progress=False
    )
    failures = [(record["task_id"], record["error"]) for record in result["records"] if not record["passed"]]
    assert failures == [] and result["num_passed"] == 164 and result["pass@1"] == 1.0


@pytest.mark.slow
def test_mbpp_reference_programs_pass_427_of_427(mbpp):
    result = score_code_predictions(
        "mbpp", reference_predictions("mbpp", mbpp), mbpp, postprocess=True, allow_subset=True, progress=False
    )
    failures = [(record["task_id"], record["error"]) for record in result["records"] if not record["passed"]]
    assert failures == [] and result["num_passed"] == 427 and result["pass@1"] == 1.0


@pytest.mark.slow
def test_wrong_bodies_pass_no_humaneval_task(humaneval):
    rows = [{"task_id": task.task_id, "completion": "    return None\n"} for task in humaneval]
    result = score_code_predictions("humaneval", rows, humaneval, progress=False)
    assert result["num_passed"] == 0 and result["pass@1"] == 0.0


@pytest.mark.slow
def test_wrong_programs_pass_no_mbpp_task(mbpp):
    rows = [
        {"task_id": task.task_id, "completion": f"def {task.entry_point}(*args, **kwargs):\n    return None\n"}
        for task in mbpp
    ]
    result = score_code_predictions("mbpp", rows, mbpp, allow_subset=True, progress=False)
    assert result["num_passed"] == 0 and result["pass@1"] == 0.0
