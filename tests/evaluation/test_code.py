"""Code generation scoring: prompts, the paper's post-processing, predictions IO and the two entry scripts."""

from __future__ import annotations

import json
import runpy
import sys

import pytest
from tlora.evaluation.code import (
    evaluate_code,
    generate_code_predictions,
    score_code_predictions,
)
from tlora.evaluation.code import code_generation_settings as generation_settings
from tlora.evaluation.code_cleanup import HUMANEVAL_INSTRUCTION, build_prompt, build_solution, postprocess_completion
from tlora.evaluation.code_data import CodeTask, load_code_tasks, normalise_task_id, read_code_predictions
from tlora.evaluation.common import DataFormatError
from tlora.evaluation.generation import CallableBackend
from tlora.data.prompts import format_prompt

ADD_TASK = CodeTask(
    task_id="HumanEval/900",
    text='def add(a, b):\n    """Return a + b."""\n',
    entry_point="add",
    tests=["def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n\ncheck(add)\n"],
    reference='def add(a, b):\n    """Return a + b."""\n    return a + b\n',
)


# ------------------------------------------------------------------------------------------------ post-processing


def test_postprocess_keeps_the_first_python_fence_and_its_indentation():
    raw = "Here is the body:\n```python\n    return a + b\n```\nIt adds.\n```python\nprint(add(1, 2))\n```"
    assert postprocess_completion(raw) == "    return a + b\n"


def test_postprocess_takes_an_untagged_fence_and_an_unclosed_one():
    assert postprocess_completion("```\ndef f():\n    return 1\n```") == "def f():\n    return 1\n"
    assert postprocess_completion("```python\ndef f():\n    return 1\n") == "def f():\n    return 1\n"


def test_postprocess_cuts_the_main_block_and_trailing_examples():
    raw = (
        "def f(x):\n    assert x >= 0\n    return x * 2\n\n"
        "# Example usage\nprint(f(2))\nassert f(1) == 2\n\n"
        'if __name__ == "__main__":\n    print(f(3))\n'
    )
    assert postprocess_completion(raw) == "def f(x):\n    assert x >= 0\n    return x * 2\n"


def test_postprocess_keeps_top_level_code_followed_by_a_definition():
    raw = "import math\n# Test helper below\ndef helper():\n    return math.pi\n\nassert helper() > 3\n"
    assert postprocess_completion(raw) == "import math\n# Test helper below\ndef helper():\n    return math.pi\n"


def test_postprocess_strips_carriage_returns_and_leading_blank_lines():
    assert postprocess_completion("\r\n\n    return 1\r\n") == "    return 1\n"
    assert postprocess_completion("   \n") == ""


def test_postprocess_is_idempotent_on_clean_code():
    clean = "def f(a):\n    return [x for x in a if x]\n"
    assert postprocess_completion(postprocess_completion(clean)) == clean


# ------------------------------------------------------------------------------------------------ prompts and data


def test_humaneval_prompt_is_the_alpaca_template_around_the_instruction(shared_data):
    task = load_code_tasks("humaneval", str(shared_data / "humaneval" / "HumanEval.jsonl.gz"), limit=1)[0]
    prompt = build_prompt("humaneval", task)
    assert prompt == format_prompt(HUMANEVAL_INSTRUCTION.format(prompt=task.text.rstrip()))
    assert prompt.endswith('"""\n\n### Response:')
    assert "def has_close_elements(numbers: List[float], threshold: float) -> bool:" in prompt


def test_mbpp_prompt_holds_the_problem_and_its_first_test(shared_data):
    task = load_code_tasks("mbpp", str(shared_data / "mbpp" / "sanitized-mbpp.json"), limit=1)[0]
    assert task.task_id == "Mbpp/2" and task.entry_point == "similar_elements"
    instruction = "Write a function to find the shared elements from the given two lists.\n" + task.tests[0]
    assert build_prompt("mbpp", task) == format_prompt(instruction)


def test_every_mbpp_task_names_the_function_its_tests_call(shared_data):
    tasks = load_code_tasks("mbpp", str(shared_data / "mbpp" / "sanitized-mbpp.json"))
    assert len(tasks) == 427
    assert all(task.entry_point and task.entry_point + "(" in task.example_test.replace(" (", "(") for task in tasks)


def test_task_ids_are_normalised():
    assert normalise_task_id("mbpp", 2) == normalise_task_id("mbpp", "MBPP/2") == "Mbpp/2"
    assert normalise_task_id("humaneval", "7") == "HumanEval/7"
    assert normalise_task_id("humaneval", "HumanEval/7") == "HumanEval/7"


def test_solutions_follow_evalplus_conventions():
    assert build_solution("humaneval", ADD_TASK.text, "    return a + b\n") == ADD_TASK.reference
    assert build_solution("mbpp", "ignored", "def f():\n    pass\n") == "def f():\n    pass\n"


def test_a_full_function_after_the_humaneval_prompt_still_scores():
    completion = "```python\ndef add(a, b):\n    return a + b\n```"
    result = score_code_predictions(
        "humaneval",
        [{"task_id": "HumanEval/900", "completion": completion}],
        [ADD_TASK],
        allow_subset=True,
        progress=False,
    )
    assert result["pass@1"] == 1.0 and result["records"][0]["passed"]


def test_predictions_file_errors_name_the_line(tmp_path):
    path = tmp_path / "predictions.jsonl"
    path.write_text(json.dumps({"task_id": "HumanEval/0", "completion": 3}) + "\n")
    with pytest.raises(ValueError, match="line 1: 'completion' must be a string"):
        read_code_predictions(str(path), "humaneval")


def test_unknown_task_ids_are_rejected_and_missing_ones_need_allow_subset(shared_data):
    with pytest.raises(ValueError, match="not in the test set"):
        score_code_predictions(
            "humaneval", [{"task_id": "HumanEval/1", "completion": ""}], [ADD_TASK], allow_subset=True, progress=False
        )
    data_file = str(shared_data / "humaneval" / "HumanEval.jsonl.gz")
    tasks = load_code_tasks("humaneval", data_file)
    rows = [{"task_id": "HumanEval/0", "completion": tasks[0].reference[len(tasks[0].text) :]}]
    with pytest.raises(ValueError, match=r"163 of the 164 humaneval tasks have no prediction \(first: HumanEval/1\)"):
        score_code_predictions("humaneval", rows, tasks, data_file=data_file, progress=False)
    result = score_code_predictions("humaneval", rows, tasks, data_file=data_file, allow_subset=True, progress=False)
    assert result["pass@1"] == 1.0 and result["num_items"] == 1
    assert result["data"] == {"source": data_file, "num_items": 1, "expected_items": 164, "subset": True}


def test_a_predictions_file_with_a_duplicated_unknown_or_no_task_is_refused_with_its_line(tmp_path, shared_data):
    # A file holding a task twice used to be scored as the mean of both rows, silently.
    data_file = str(shared_data / "mbpp" / "sanitized-mbpp.json")
    tasks = load_code_tasks("mbpp", data_file, limit=2)
    path = tmp_path / "mbpp_predictions.jsonl"
    cases = [
        (
            [tasks[0].task_id, tasks[1].task_id, tasks[0].task_id],
            rf"line 3 \(row 2\): task {tasks[0].task_id} appears twice \(first at .*line 1 \(row 0\)\)",
        ),
        ([tasks[0].task_id, "Mbpp/999999"], r"line 2 \(row 1\): task Mbpp/999999 is outside the first 2 tasks of "),
        ([], r"holds no predictions \(an empty file\)"),
    ]
    for task_ids, message in cases:
        path.write_text("".join(json.dumps({"task_id": task_id, "completion": "pass"}) + "\n" for task_id in task_ids))
        with pytest.raises(DataFormatError, match=message):
            evaluate_code(
                "mbpp", predictions_file=str(path), data_file=data_file, limit=2, protocol="robust", allow_subset=True
            )


def test_several_samples_per_task_give_the_mean_pass_rate():
    rows = [{"task_id": "HumanEval/900", "completion": body} for body in ("    return a + b\n", "    return a - b\n")]
    result = score_code_predictions("humaneval", rows, [ADD_TASK], allow_subset=True, progress=False)
    assert result["pass@1"] == 0.5 and result["pass@1_plus"] is None and result["num_items"] == 1


# ------------------------------------------------------------------------------------------------ generation


def test_generation_keeps_raw_and_postprocessed_completions():
    seen = []

    def model(prompt: str) -> str:
        seen.append(prompt)
        return "```python\n    return a + b\n```\n### Instruction:\nmore"

    rows = generate_code_predictions("humaneval", [ADD_TASK], CallableBackend(model), generation_settings())
    assert seen == [build_prompt("humaneval", ADD_TASK)]
    assert rows[0]["raw_completion"] == "```python\n    return a + b\n```\n"  # cut at the stop string
    assert rows[0]["completion"] == "    return a + b\n"
    assert generation_settings().max_new_tokens == 1024 and generation_settings().temperature == 0.0


def test_evaluate_code_generates_scores_and_writes_both_files(tmp_path, shared_data):
    data_file = str(shared_data / "humaneval" / "HumanEval.jsonl.gz")
    tasks = {task.task_id: task for task in load_code_tasks("humaneval", data_file, limit=3)}
    canonical = {task_id: task.reference[len(task.text) :] for task_id, task in tasks.items()}

    def model(prompt: str) -> str:
        for task_id, task in tasks.items():
            if task.text.rstrip() in prompt:
                return f"```python\n{canonical[task_id]}```" if task_id != "HumanEval/2" else "    return 0.0\n"
        raise AssertionError("unknown prompt")

    output = tmp_path / "eval" / "humaneval.json"
    result = evaluate_code(
        "humaneval", backend=CallableBackend(model), data_file=data_file, output=str(output), limit=3
    )
    saved = json.loads(output.read_text())
    assert saved["pass@1"] == pytest.approx(2 / 3) == result["pass@1"]
    assert saved["task"] == "humaneval" and saved["num_items"] == 3 and saved["pass@1_plus"] is None
    assert [record["passed"] for record in saved["records"]] == [True, True, False]
    assert set(saved["records"][0]) >= {"task_id", "prompt", "completion", "solution", "passed", "plus_passed", "error"}
    predictions = [
        json.loads(line) for line in (tmp_path / "eval" / "humaneval_predictions.jsonl").read_text().splitlines()
    ]
    assert [row["task_id"] for row in predictions] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert predictions[0]["raw_completion"].startswith("```python")


# ------------------------------------------------------------------------------------------------ entry scripts


def run_script(repo_root, script: str, arguments: list[str], monkeypatch) -> None:
    """Run an entry script in this process, as `python script arguments` would."""
    monkeypatch.setattr(sys, "argv", [script, *arguments])
    runpy.run_path(str(repo_root / script), run_name="__main__")


def test_eval_code_scores_a_predictions_file_without_a_model(tmp_path, shared_data, repo_root, monkeypatch, capsys):
    data_file = shared_data / "mbpp" / "sanitized-mbpp.json"
    tasks = load_code_tasks("mbpp", str(data_file), limit=4)
    predictions = tmp_path / "mbpp_predictions.jsonl"
    rows = [
        {"task_id": int(task.task_id.split("/")[1]), "completion": f"```python\n{task.reference}\n```"}
        for task in tasks
    ]
    rows[-1]["completion"] = "def nothing():\n    pass\n"
    predictions.write_text("".join(json.dumps(row) + "\n" for row in rows))
    output = tmp_path / "mbpp.json"
    run_script(
        repo_root,
        "code/eval_code.py",
        [
            "--dataset",
            "mbpp",
            "--data_file",
            str(data_file),
            "--predictions",
            str(predictions),
            "--output",
            str(output),
            "--limit",
            "4",
            "--protocol",
            "robust",
        ],
        monkeypatch,
    )
    result = json.loads(output.read_text())
    assert result["pass@1"] == 0.75 and result["predictions_file"] == str(predictions)
    assert result["protocol"] == "robust" and result["tests"] == "original asserts"
    assert result["data"] == {"source": str(data_file), "num_items": 4, "expected_items": 378, "subset": True}
    assert "mbpp pass@1 0.7500 (4 tasks, subset; protocol robust, tests original asserts)" in capsys.readouterr().out


def test_gen_vllm_writes_generations_for_both_tasks_with_the_hf_backend(
    tmp_path, tiny_model_dir, shared_data, repo_root, monkeypatch
):
    run_script(
        repo_root,
        "gen_vllm.py",
        [
            "--model",
            str(tiny_model_dir),
            "--backend",
            "hf",
            "--output_dir",
            str(tmp_path),
            "--limit",
            "2",
            "--max_new_tokens",
            "4",
            "--humaneval_data_file",
            str(shared_data / "humaneval" / "HumanEval.jsonl.gz"),
            "--mbpp_data_file",
            str(shared_data / "mbpp" / "sanitized-mbpp.json"),
        ],
        monkeypatch,
    )
    for task, first_id in (("humaneval", "HumanEval/0"), ("mbpp", "Mbpp/2")):
        rows = [json.loads(line) for line in (tmp_path / f"{task}_predictions.jsonl").read_text().splitlines()]
        assert len(rows) == 2 and rows[0]["task_id"] == first_id
        assert set(rows[0]) == {"task_id", "prompt", "raw_completion", "completion"}
        assert rows[0]["prompt"].endswith("### Response:") and len(rows[0]["raw_completion"]) > 0


def test_code_results_carry_the_common_result_keys_of_every_task():
    result = score_code_predictions(
        "humaneval",
        [{"task_id": "HumanEval/900", "completion": "    return a + b\n"}],
        [ADD_TASK],
        allow_subset=True,
        progress=False,
    )
    assert {"task", "protocol", "data", "num_items", "model", "backend", "records"} <= set(result)
    assert (result["task"], result["protocol"], result["num_items"], result["data"]["num_items"]) == (
        "humaneval",
        "robust",
        1,
        1,
    )
