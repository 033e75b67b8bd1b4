"""Scoring through EvalPlus's own sandbox when HumanEval+ / MBPP+ data is present (stand-in data files built here
from the real HumanEval and MBPP rows with a few hand-written base and plus inputs; the real EvalPlus files cannot
be downloaded in tests)."""

from __future__ import annotations

import gzip
import json

import pytest
from tlora.evaluation.code import load_code_tasks, score_code_predictions

pytest.importorskip("evalplus")


def write_jsonl(path, rows) -> str:
    """Write rows as JSON lines and return the path."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture(scope="module")
def humaneval_plus(shared_data, tmp_path_factory) -> str:
    """A two-task HumanEvalPlus.jsonl stand-in (real prompts and canonical solutions)."""
    with gzip.open(shared_data / "humaneval" / "HumanEval.jsonl.gz", "rt") as handle:
        rows = {row["task_id"]: row for row in map(json.loads, handle)}

    def plus_row(task_id, base, plus, atol=0):
        row = rows[task_id]
        return {
            "task_id": task_id,
            "prompt": row["prompt"],
            "canonical_solution": row["canonical_solution"],
            "entry_point": row["entry_point"],
            "contract": "",
            "base_input": base,
            "plus_input": plus,
            "atol": atol,
        }

    return write_jsonl(
        tmp_path_factory.mktemp("evalplus") / "HumanEvalPlus.jsonl",
        [
            plus_row(
                "HumanEval/0",
                [[[1.0, 2.0, 3.0], 0.5], [[1.0, 2.8, 3.0, 4.0, 5.0, 2.0], 0.3]],
                [[[1.0, 1.05], 0.1], [[5.0, 1.0, 9.0], 3.9], [[], 1.0]],
            ),
            plus_row("HumanEval/2", [[3.5], [1.33]], [[123.456], [0.0001]], atol=1e-6),
        ],
    )


@pytest.fixture(scope="module")
def mbpp_plus(shared_data, tmp_path_factory) -> str:
    """A one-task MbppPlus.jsonl stand-in for Mbpp/2 (tuple inputs are stored as lists, as in EvalPlus's file)."""
    row = {task["task_id"]: task for task in json.loads((shared_data / "mbpp" / "sanitized-mbpp.json").read_text())}[2]
    prompt = f'"""\n{row["prompt"]}\n{row["test_list"][0]}\n"""\n'
    return write_jsonl(
        tmp_path_factory.mktemp("evalplus") / "MbppPlus.jsonl",
        [
            {
                "task_id": "Mbpp/2",
                "prompt": prompt,
                "canonical_solution": row["code"],
                "entry_point": "similar_elements",
                "contract": "",
                "base_input": [[[3, 4, 5, 6], [5, 7, 4, 10]], [[1, 2, 3, 4], [5, 4, 3, 7]]],
                "plus_input": [[[1, 2], [3, 4]], [[7, 7, 8], [8, 7]]],
                "atol": 0,
                "assertion": "",
            }
        ],
    )


def test_humaneval_plus_scores_base_and_plus_through_evalplus(shared_data, humaneval_plus, monkeypatch):
    monkeypatch.setenv("HUMANEVAL_OVERRIDE_PATH", humaneval_plus)
    tasks = load_code_tasks("humaneval", str(shared_data / "humaneval" / "HumanEval.jsonl.gz"))
    rows = [
        {
            "task_id": "HumanEval/0",
            "completion": "    return any(abs(a - b) < threshold for i, a in enumerate(numbers)"
            " for b in numbers[i + 1:])\n",
        },
        {"task_id": "HumanEval/2", "completion": "    return number % 1.0\n"},
    ]
    result = score_code_predictions("humaneval", rows, tasks, workers=1, progress=False)
    assert result["tests"] == "evalplus" and result["evalplus_file"] == humaneval_plus
    assert result["num_items"] == 2 and result["pass@1"] == 1.0 and result["pass@1_plus"] == 1.0


def test_a_solution_that_only_fits_the_base_inputs_fails_plus(shared_data, humaneval_plus):
    tasks = load_code_tasks("humaneval", str(shared_data / "humaneval" / "HumanEval.jsonl.gz"))
    rows = [
        {"task_id": "HumanEval/0", "completion": "    return numbers == [1.0, 2.8, 3.0, 4.0, 5.0, 2.0]\n"},
        {"task_id": "HumanEval/2", "completion": "    return 0.5\n"},
    ]
    result = score_code_predictions("humaneval", rows, tasks, evalplus_file=humaneval_plus, workers=2, progress=False)
    by_task = {record["task_id"]: record for record in result["records"]}
    assert by_task["HumanEval/0"]["passed"] and not by_task["HumanEval/0"]["plus_passed"]
    assert by_task["HumanEval/0"]["status"] == {"base": "pass", "plus": "fail"}
    assert not by_task["HumanEval/2"]["passed"] and by_task["HumanEval/2"]["status"]["plus"] is None
    assert result["pass@1"] == 0.5 and result["pass@1_plus"] == 0.0


def test_mbpp_plus_uses_the_evalplus_task_set_and_deserialised_inputs(shared_data, mbpp_plus):
    tasks = load_code_tasks("mbpp", str(shared_data / "mbpp" / "sanitized-mbpp.json"))
    reference = next(task for task in tasks if task.task_id == "Mbpp/2").reference
    rows = [{"task_id": 2, "completion": reference}, {"task_id": 3, "completion": "def is_not_prime(n):\n    pass\n"}]
    result = score_code_predictions("mbpp", rows, tasks, evalplus_file=mbpp_plus, workers=1, progress=False)
    assert result["num_items"] == 1 and result["num_predictions"] == 1  # Mbpp/3 is outside this EvalPlus set
    assert result["pass@1"] == 1.0 and result["pass@1_plus"] == 1.0


def test_an_infinite_loop_is_stopped_by_evalplus(shared_data, mbpp_plus):
    tasks = load_code_tasks("mbpp", str(shared_data / "mbpp" / "sanitized-mbpp.json"))
    rows = [{"task_id": "Mbpp/2", "completion": "def similar_elements(a, b):\n    while True:\n        pass\n"}]
    result = score_code_predictions("mbpp", rows, tasks, evalplus_file=mbpp_plus, workers=1, progress=False)
    assert result["pass@1"] == 0.0 and result["records"][0]["status"]["base"] in ("timeout", "fail")


def test_a_missing_evalplus_file_says_what_to_do(shared_data, monkeypatch):
    monkeypatch.setenv("MBPP_OVERRIDE_PATH", "/nonexistent/MbppPlus.jsonl")
    with pytest.raises(FileNotFoundError, match="MBPP_OVERRIDE_PATH"):
        score_code_predictions(
            "mbpp",
            [],
            load_code_tasks("mbpp", str(shared_data / "mbpp" / "sanitized-mbpp.json"), limit=1),
            progress=False,
        )
