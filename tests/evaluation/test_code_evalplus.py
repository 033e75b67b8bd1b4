"""Scoring through EvalPlus's own sandbox when HumanEval+ / MBPP+ data is present (stand-in data files built here
from the real HumanEval and MBPP rows with a few hand-written base and plus inputs; the real EvalPlus files cannot
be downloaded in tests)."""

from __future__ import annotations

import gzip
import json

import pytest
from tlora.evaluation import code_data as code
from tlora.evaluation.code import score_code_predictions
from tlora.evaluation.code_cleanup import paper_postprocess_completion
from tlora.evaluation.code_data import load_code_tasks

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
    assert result["task_set"] == humaneval_plus  # the stand-in's two tasks are the task set
    assert result["tests"] == "evalplus base+plus" and result["evalplus_file"] == humaneval_plus
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


def test_evalplus_compares_outside_the_program_and_the_program_cannot_write_host_files(
    shared_data, humaneval_plus, tmp_path
):
    tasks = load_code_tasks("humaneval", str(shared_data / "humaneval" / "HumanEval.jsonl.gz"))
    written = tmp_path / "written-by-the-program.txt"
    rows = [
        {
            "task_id": "HumanEval/0",
            "completion": "    class Equal:\n        def __eq__(self, other):\n            return True\n    return Equal()\n",
        },
        {"task_id": "HumanEval/2", "completion": f"    open({str(written)!r}, 'w').write('x')\n    return number % 1.0\n"},
    ]
    result = score_code_predictions("humaneval", rows, tasks, evalplus_file=humaneval_plus, workers=2, progress=False)
    assert [record["status"]["base"] for record in result["records"]] == ["fail", "fail"]
    assert result["pass@1"] == 0.0 and not written.exists()


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


# ------------------------------------------------------------------------------------------------ task sets (issue 11)


def test_mbpp_hub_default_loads_all_427_sanitized_tasks_not_the_257_of_its_test_split(shared_data, monkeypatch):
    rows = json.loads((shared_data / "mbpp" / "sanitized-mbpp.json").read_text())
    calls = []

    def fake_load_rows(source, *, hub_config=None, hub_split="test"):
        calls.append((source, hub_config, hub_split))
        return rows  # what the hub returns for the four splits together

    monkeypatch.setattr(code, "load_rows", fake_load_rows)
    tasks = load_code_tasks("mbpp")
    assert calls == [("google-research-datasets/mbpp", "sanitized", "prompt+train+validation+test")]
    assert len(tasks) == 427


def test_a_task_of_the_evalplus_set_missing_from_the_data_fails_scoring(shared_data, mbpp_plus, tmp_path):
    plus_rows = [json.loads(line) for line in open(mbpp_plus)]
    extended = tmp_path / "MbppPlus.jsonl"
    extended_rows = plus_rows + [{**plus_rows[0], "task_id": "Mbpp/9999"}]
    extended.write_text("".join(json.dumps(row) + "\n" for row in extended_rows))
    tasks = load_code_tasks("mbpp", str(shared_data / "mbpp" / "sanitized-mbpp.json"))
    reference = next(task for task in tasks if task.task_id == "Mbpp/2").reference
    rows = [{"task_id": "Mbpp/2", "completion": reference}]
    with pytest.raises(ValueError, match=r"1 of the 2 mbpp tasks of .*MbppPlus.jsonl are not in .*first: Mbpp/9999"):
        score_code_predictions("mbpp", rows, tasks, evalplus_file=str(extended), workers=1, progress=False)
    result = score_code_predictions(
        "mbpp", rows, tasks, evalplus_file=str(extended), allow_subset=True, workers=1, progress=False
    )
    assert result["num_items"] == 1 and result["pass@1"] == 1.0
    assert result["data"]["subset"] is True and result["data"]["expected_items"] == 378


def test_without_the_mbpp_plus_file_the_task_set_is_unknown_and_says_what_to_do(shared_data, monkeypatch):
    monkeypatch.delenv("MBPP_OVERRIDE_PATH", raising=False)
    monkeypatch.setattr(code, "evalplus_cache_file", lambda dataset: "/nonexistent/MbppPlus-v0.2.0.jsonl")
    tasks = load_code_tasks("mbpp", str(shared_data / "mbpp" / "sanitized-mbpp.json"))
    with pytest.raises(FileNotFoundError, match=r"MBPP\+ task set \(378 tasks\).*MBPP_OVERRIDE_PATH.*--allow_subset"):
        code.tasks_to_generate("mbpp", str(shared_data / "mbpp" / "sanitized-mbpp.json"))
    with pytest.raises(FileNotFoundError, match="--allow_subset"):
        score_code_predictions("mbpp", [], tasks, progress=False)


def test_gen_vllm_refuses_an_incomplete_task_set_before_loading_the_model(shared_data, mbpp_plus, tmp_path, repo_root):
    import subprocess
    import sys

    partial = tmp_path / "mbpp_partial.json"
    rows = json.loads((shared_data / "mbpp" / "sanitized-mbpp.json").read_text())
    partial.write_text(json.dumps([row for row in rows if row["task_id"] != 2]))
    process = subprocess.run(
        [sys.executable, "gen_vllm.py", "--model", str(tmp_path / "no_model"), "--tasks", "mbpp",
         "--mbpp_data_file", str(partial)],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "MBPP_OVERRIDE_PATH": mbpp_plus},
    )
    assert process.returncode != 0
    assert "1 of the 1 mbpp tasks of" in process.stderr and "(first: Mbpp/2)" in process.stderr


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Sure!\n```python\ndef f(x):\n    return x\n```\nDone.", "def f(x):\n    return x"),
        ("```python\n    return a + b\n```", "return a + b"),  # the authors strip the block (indentation lost)
        ("def f(x):\n    assert x > 0\n    return x\n", "def f(x):"),  # cut at the first `assert` anywhere
        ('def f():\n    return 1\n\nif __name__ == "__main__":\n    print(f())', "def f():\n    return 1"),
        ("def f():\n    return 1\n# Example usage\nprint(f())", "def f():\n    return 1"),
        ("def f():\r\n    return 1\r\n", "def f():\n    return 1\n"),  # no fence: only `\r` removed
    ],
)
def test_paper_postprocessing_is_the_authors_code_process(raw, expected):
    assert paper_postprocess_completion(raw) == expected


def test_paper_protocol_scores_prompt_plus_completion_with_evalplus(shared_data, mbpp_plus):
    tasks = load_code_tasks("mbpp", str(shared_data / "mbpp" / "sanitized-mbpp.json"))
    reference = next(task for task in tasks if task.task_id == "Mbpp/2").reference
    rows = [{"task_id": "Mbpp/2", "completion": f"```python\n{reference}\n```\nassert similar_elements((1,), (1,))"}]
    result = score_code_predictions(
        "mbpp", rows, tasks, evalplus_file=mbpp_plus, protocol="paper", workers=1, progress=False
    )
    record = result["records"][0]
    assert record["solution"].startswith('"""\n') and record["solution"].endswith(reference.strip())
    assert result["pass@1"] == 1.0 and result["protocol"] == "paper" and result["tests"] == "evalplus base+plus"


def test_paper_protocol_needs_evalplus_data(shared_data, monkeypatch):
    monkeypatch.delenv("HUMANEVAL_OVERRIDE_PATH", raising=False)
    monkeypatch.setattr(code, "evalplus_cache_file", lambda dataset: "/nonexistent/HumanEvalPlus.jsonl")
    tasks = load_code_tasks("humaneval", str(shared_data / "humaneval" / "HumanEval.jsonl.gz"))
    with pytest.raises(FileNotFoundError, match="--protocol paper scores humaneval with EvalPlus"):
        score_code_predictions("humaneval", [], tasks, protocol="paper", progress=False)


def test_generation_covers_exactly_the_evalplus_task_set(shared_data, mbpp_plus):
    selected = code.tasks_to_generate("mbpp", str(shared_data / "mbpp" / "sanitized-mbpp.json"), evalplus_file=mbpp_plus)
    assert [task.task_id for task in selected] == ["Mbpp/2"]  # of the 427 sanitized tasks, only the EvalPlus set


def test_the_evalplus_judge_is_a_module_that_checks_base_then_plus(humaneval_plus, tmp_path):
    from tlora.evaluation import evalplus_judge
    from tlora.evaluation.sandbox import SandboxLimits, helper_config, resolve_isolation

    config = json.loads(helper_config(resolve_isolation(SandboxLimits()), str(tmp_path)))
    limits = {"memory_mb": 4096, "max_file_mb": 16, "max_processes": 32}

    def job(solution: str) -> dict:
        return {
            "dataset": "humaneval",
            "path": humaneval_plus,
            "task_id": "HumanEval/2",
            "solution": solution,
            "limits": limits,
        }

    prompt = evalplus_judge.problems("humaneval", humaneval_plus)["HumanEval/2"]["prompt"]
    assert evalplus_judge.check(config, job(prompt + "    return number % 1.0\n")) == {"base": "pass", "plus": "pass"}
    assert evalplus_judge.check(config, job(prompt + "    return 0.5\n")) == {"base": "fail", "plus": None}
