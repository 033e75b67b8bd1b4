"""Commonsense scoring (LLM-Adapters protocol): gold outputs score 1.0, answer-word extraction, task selection."""

from __future__ import annotations

import json
import runpy
import sys

import pytest
from tlora.evaluation import commonsense
from tlora.evaluation.common import DataFormatError, EvaluationArguments, GeneratorArguments, read_json_rows
from tlora.evaluation.commonsense import CommonsenseArguments, extract_answer, run
from tlora.evaluation.generation import CallableBackend
from tlora.data.prompts import format_prompt

SHIPPED_TASKS = ["boolq", "piqa", "social_i_qa", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa"]
SAMPLE = 40  # rows per task


def write_rows(path, rows) -> str:
    """Write JSON lines and return the path as a string."""
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return str(path)


def sample_predictions(data_dir, tasks, corrupt: bool = False) -> list[dict]:
    """Every SAMPLE-th row's gold `output` as its completion (or another answer word of the task)."""
    predictions = []
    for task in tasks:
        rows = read_json_rows(str(data_dir / task / "test.json"))
        for index in range(0, len(rows), max(1, len(rows) // SAMPLE)):
            completion = rows[index]["output"]
            if corrupt:
                words = commonsense.ANSWER_WORDS[task]
                wrong = next(word for word in words if word != rows[index]["answer"])
                completion = f"the correct answer is {wrong}"
            predictions.append({"id": index, "task": task, "completion": completion})
    return predictions


def test_gold_outputs_score_one_and_wrong_answer_words_score_zero(shared_data, tmp_path):
    data_dir = shared_data / "commonsense"
    for corrupt, expected in ((False, 1.0), (True, 0.0)):
        predictions = write_rows(
            tmp_path / f"predictions_{corrupt}.jsonl", sample_predictions(data_dir, SHIPPED_TASKS, corrupt)
        )
        result = run(
            GeneratorArguments(),
            EvaluationArguments(predictions=predictions),
            CommonsenseArguments(data_dir=str(data_dir), tasks=",".join(SHIPPED_TASKS)),
            write=False,
        )
        assert set(result["tasks"]) == set(SHIPPED_TASKS)
        assert all(entry["accuracy"] == expected for entry in result["tasks"].values())
        assert all(entry["num_items"] >= SAMPLE for entry in result["tasks"].values())
        assert result["accuracy"] == expected


@pytest.mark.parametrize(
    ("task", "completion", "expected"),
    [
        ("boolq", "the correct answer is true", "true"),
        ("boolq", "False. It is not.", "false"),
        ("boolq", "the correct answer is", None),
        ("piqa", "the correct answer is solution2", "solution2"),
        ("social_i_qa", "answer3 because answer1 is wrong", "answer3"),  # the first answer word counts
        ("ARC-Challenge", "The correct answer is Answer4", "answer4"),
        ("winogrande", "option1", "option1"),
        ("hellaswag", "the correct answer is ending4", "ending4"),
        ("openbookqa", "solution1", None),  # another task's vocabulary is no answer
        ("piqa", "", None),
    ],
)
def test_answer_word_extraction(task, completion, expected):
    assert extract_answer(task, completion) == expected


def test_headline_is_the_unweighted_mean_of_the_tasks(tmp_path):
    data_dir = tmp_path / "data"
    for task, answers in (("boolq", ["true", "false", "true", "false"]), ("piqa", ["solution1", "solution2"])):
        (data_dir / task).mkdir(parents=True)
        rows = [
            {"instruction": f"{task} question {i}", "input": "", "output": f"the correct answer is {a}", "answer": a}
            for i, a in enumerate(answers)
        ]
        (data_dir / task / "test.json").write_text(json.dumps(rows))
    backend = CallableBackend(
        lambda prompt: "the correct answer is true\n### Instruction" if "boolq" in prompt else "solution1"
    )
    output = tmp_path / "out" / "commonsense.json"
    result = run(
        GeneratorArguments(model="tiny"),
        EvaluationArguments(output=str(output)),
        CommonsenseArguments(data_dir=str(data_dir), tasks="boolq,piqa"),
        backend=backend,
    )
    assert result["tasks"] == {"boolq": {"accuracy": 0.5, "num_items": 4}, "piqa": {"accuracy": 0.5, "num_items": 2}}
    assert result["accuracy"] == 0.5 and result["micro_accuracy"] == 0.5 and result["num_items"] == 6
    written = json.loads(output.read_text())
    assert written["task"] == "commonsense" and written["backend"] == "callable"
    record = written["records"][0]
    assert record["prompt"] == format_prompt("boolq question 0")
    assert (record["task"], record["completion"], record["extracted"], record["gold"]) == (
        "boolq",
        "the correct answer is true\n",
        "true",
        "true",
    )
    predictions = [
        json.loads(line) for line in (tmp_path / "out" / "commonsense_predictions.jsonl").read_text().splitlines()
    ]
    assert predictions[0] == {"id": 0, "completion": "the correct answer is true\n", "task": "boolq"}
    rescored = run(
        GeneratorArguments(),
        EvaluationArguments(predictions=str(tmp_path / "out" / "commonsense_predictions.jsonl")),
        CommonsenseArguments(data_dir=str(data_dir), tasks="boolq,piqa"),
        write=False,
    )
    assert rescored["records"] == written["records"]


def test_missing_task_files_and_bad_arguments_are_clear_errors(shared_data, tmp_path):
    data_dir = str(shared_data / "commonsense")
    with pytest.raises(FileNotFoundError, match=r"\['hellaswag'\].*--tasks boolq,piqa"):
        run(
            GeneratorArguments(), EvaluationArguments(predictions="x"), CommonsenseArguments(data_dir=data_dir),
            write=False,
        )
    with pytest.raises(ValueError, match="Pass --data_dir"):
        run(GeneratorArguments(), EvaluationArguments(predictions="x"), CommonsenseArguments(), write=False)
    with pytest.raises(ValueError, match="Unknown commonsense task"):
        run(
            GeneratorArguments(),
            EvaluationArguments(predictions="x"),
            CommonsenseArguments(data_dir=data_dir, tasks="boolq,siqa"),
            write=False,
        )
    bad = write_rows(tmp_path / "bad.jsonl", [{"id": 0, "task": "BoolQ", "completion": "true"}])
    with pytest.raises(DataFormatError, match="unknown task name"):
        run(
            GeneratorArguments(),
            EvaluationArguments(predictions=bad),
            CommonsenseArguments(data_dir=data_dir, tasks="boolq"),
            write=False,
        )
    no_task = write_rows(tmp_path / "no_task.jsonl", [{"id": 0, "completion": "true"}])
    with pytest.raises(DataFormatError, match="'task'"):
        run(
            GeneratorArguments(),
            EvaluationArguments(predictions=no_task),
            CommonsenseArguments(data_dir=data_dir, tasks="boolq"),
            write=False,
        )


def test_wrong_answer_vocabulary_names_the_file(tmp_path):
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "test.json").write_text(
        json.dumps([{"instruction": "q", "input": "", "output": "", "answer": "answer1"}])
    )
    with pytest.raises(DataFormatError, match=r"piqa/test.json, row 0: answer 'answer1'"):
        run(
            GeneratorArguments(),
            EvaluationArguments(predictions="x"),
            CommonsenseArguments(data_dir=str(tmp_path), tasks="piqa"),
            write=False,
        )


def test_cli_scores_one_task_file_with_limit(shared_data, tmp_path, repo_root, capsys):
    data_file = shared_data / "commonsense" / "boolq" / "test.json"
    rows = read_json_rows(str(data_file))
    predictions = write_rows(
        tmp_path / "p.jsonl", [{"id": i, "task": "boolq", "completion": rows[i]["output"]} for i in range(10)]
    )
    output = tmp_path / "boolq.json"
    saved = sys.argv
    sys.argv = [
        "eval_commonsense.py",
        "--predictions",
        predictions,
        "--data_file",
        str(data_file),
        "--tasks",
        "boolq",
        "--limit",
        "5",
        "--output",
        str(output),
    ]
    try:
        runpy.run_path(str(repo_root / "commonsense" / "eval_commonsense.py"), run_name="__main__")
    finally:
        sys.argv = saved
    result = json.loads(output.read_text())
    assert result["tasks"] == {"boolq": {"accuracy": 1.0, "num_items": 5}} and result["limit"] == 5
    assert "average: 1.0000" in capsys.readouterr().out


def test_cli_generates_from_an_adapter_directory_with_the_hf_backend(
    tiny_adapter_dir, shared_data, tmp_path, repo_root
):
    output = tmp_path / "commonsense.json"
    saved = sys.argv
    sys.argv = [
        "eval_commonsense.py", "--model", str(tiny_adapter_dir), "--backend", "hf", "--device", "cpu",
        "--data_dir", str(shared_data / "commonsense"), "--tasks", "boolq,winogrande", "--limit", "2",
        "--output", str(output),
    ]  # fmt: skip
    try:
        runpy.run_path(str(repo_root / "commonsense" / "eval_commonsense.py"), run_name="__main__")
    finally:
        sys.argv = saved
    result = json.loads(output.read_text())
    assert result["backend"] == "hf" and result["model"] == str(tiny_adapter_dir)
    assert set(result["tasks"]) == {"boolq", "winogrande"} and result["num_items"] == 4
    assert result["generation"]["max_new_tokens"] == commonsense.MAX_NEW_TOKENS
    assert all(0 < len(record["completion"]) for record in result["records"])


def test_empty_repeated_unknown_and_unmatched_predictions_are_errors_naming_the_line(tmp_path):
    (tmp_path / "boolq").mkdir()
    rows = [{"instruction": f"q{i}", "input": "", "output": "true", "answer": "true"} for i in range(2)]
    (tmp_path / "boolq" / "test.json").write_text(json.dumps(rows))
    cases = (
        ([], r"p.jsonl holds no predictions \(an empty file\)"),
        (
            [("boolq", 0), ("boolq", 1), ("boolq", 0)],
            r"p.jsonl, line 3 \(row 2\): task 'boolq' id 0 appears twice \(first at .*p.jsonl, line 1 \(row 0\)\)",
        ),
        ([("boolq", 2)], r"line 1 \(row 0\): task 'boolq' id 2 is outside the data files \(boolq: 2 rows\)"),
        ([("piqa", 0)], r"p.jsonl has no prediction for any row of the tasks evaluated \(boolq\)"),
    )
    for keys, message in cases:
        predictions = write_rows(
            tmp_path / "p.jsonl", [{"id": index, "task": task, "completion": "true"} for task, index in keys]
        )
        with pytest.raises(DataFormatError, match=message):
            run(
                GeneratorArguments(),
                EvaluationArguments(predictions=predictions),
                CommonsenseArguments(data_dir=str(tmp_path), tasks="boolq"),
                write=False,
            )
