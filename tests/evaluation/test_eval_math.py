"""GSM8K and MATH scoring: gold answers as completions on the real test sets, extraction edge cases, the CLIs."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys

import pytest
from tlora.evaluation import gsm8k, math_answers
from tlora.evaluation.answers import run_task
from tlora.evaluation.common import (
    DataFormatError,
    EvaluationArguments,
    GeneratorArguments,
    read_jsonl,
)
from tlora.evaluation.generation import CallableBackend
from tlora.evaluation.protocols import PAPER_STOP_STRINGS
from tlora.data.prompts import format_prompt


def write_rows(path, rows) -> str:
    """Write JSON lines and return the path as a string."""
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return str(path)


def run_script(repo_root, script: str, *arguments: str) -> None:
    """Run an entry script in this process, as `python <script> ARGS` would."""
    saved = sys.argv
    sys.argv = [script, *arguments]
    try:
        runpy.run_path(str(repo_root / script), run_name="__main__")
    finally:
        sys.argv = saved


# ---------------------------------------------------------------------------------------------------------------
# GSM8K


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("She sells 9 eggs for $2 each.\nThe answer is: 18", "18"),
        ("The answer is: 18.", "18"),
        ("The answer is: -10", "-10"),
        ("The answer is: \u221210", "-10"),
        ("The answer is: 1,450,000", "1450000"),
        ("The answer is: $2,125.50.", "2125.5"),
        ("The answer is: 0.5", "0.5"),
        ("The answer is: .25", "0.25"),
        ("The answer is: 3/4", "0.75"),
        ("The answer is: 1/3", "1/3"),
        ("The answer is: 25%", "25"),
        ("the answer is 7 apples", "7"),
        ("Step 1: 5 - 2 = 3\nThe answer is: 3\nThe answer is: 4", "4"),  # the last marker wins
        ("16-3-4 = 9 eggs, 9 * 2 = 18", "18"),  # no marker: the last number; `16-3` is not -3
        ("x = -3 is the root", "-3"),
        ("#### 72", "72"),
        ("There are 5 apples. The answer is: five", "5"),  # no number after the marker: the last number before it
        ("I do not know.", None),
        ("", None),
    ],
)
def test_gsm8k_extraction_edge_cases(completion, expected):
    assert gsm8k.extract_answer(completion) == expected


@pytest.mark.parametrize(
    ("predicted", "gold", "correct"),
    [("18", "18", True), ("18.0", "18", True), ("36/2", "18", True), ("17.5", "18", False), ("-10", "10", False)],
)
def test_gsm8k_answers_are_compared_as_exact_numbers(predicted, gold, correct):
    assert gsm8k.answers_match(gsm8k.format_number(gsm8k.parse_number(predicted)), gold) is correct


def gsm8k_gold_completions(rows, shift: int = 0) -> list[str]:
    """Each row's worked solution rewritten in the paper's format, with the final answer plus `shift`."""
    completions = []
    for row in rows:
        body, answer = row["answer"].rsplit("####", 1)
        value = int(answer.strip().replace(",", "")) + shift
        completions.append(
            f"{body.strip()}\nThe answer is: {value:,}" if shift else f"{body.strip()}\nThe answer is: {answer.strip()}"
        )
    return completions


def test_gsm8k_gold_completions_score_one_and_corrupted_score_zero(shared_data, tmp_path):
    data_file = str(shared_data / "gsm8k" / "test.jsonl")
    rows = read_jsonl(data_file)
    assert len(rows) == 1319
    for shift, expected in ((0, 1.0), (1, 0.0)):
        predictions = write_rows(
            tmp_path / f"shift{shift}.jsonl",
            [{"id": index, "completion": text} for index, text in enumerate(gsm8k_gold_completions(rows, shift))],
        )
        result = run_task(
            gsm8k.TASK,
            GeneratorArguments(),
            EvaluationArguments(data_file=data_file, predictions=predictions),
            write=False,
        )
        assert result["num_items"] == 1319
        assert result["accuracy"] == expected


def test_gsm8k_scoring_only_cli_writes_result_and_predictions(shared_data, tmp_path, repo_root):
    data_file = str(shared_data / "gsm8k" / "test.jsonl")
    rows = read_jsonl(data_file)[:5]
    completions = gsm8k_gold_completions(rows)
    completions[1] = "I am not sure."
    predictions = write_rows(
        tmp_path / "predictions.jsonl", [{"id": i, "completion": c} for i, c in enumerate(completions)]
    )
    output = tmp_path / "out" / "gsm8k.json"
    process = subprocess.run(
        [
            sys.executable,
            "math/eval_gsm8k.py",
            "--predictions",
            predictions,
            "--data_file",
            data_file,
            "--output",
            str(output),
            "--protocol",
            "robust",
        ],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert process.returncode == 0, process.stderr[-2000:]
    assert f"gsm8k: accuracy 0.8000 (4/5 correct; protocol robust, {data_file}, subset)" in process.stdout
    result = json.loads(output.read_text())
    assert (result["task"], result["accuracy"], result["num_items"], result["model"]) == ("gsm8k", 0.8, 5, None)
    assert result["data_file"] == data_file and result["backend"] is None
    first = result["records"][0]
    assert set(first) == {"id", "prompt", "completion", "extracted", "gold", "correct"}
    assert first["prompt"] == format_prompt(rows[0]["question"])
    assert (first["extracted"], first["gold"], first["correct"]) == ("18", "18", True)
    assert result["records"][1]["extracted"] is None and result["records"][1]["correct"] is False
    rewritten = read_jsonl(str(tmp_path / "out" / "gsm8k_predictions.jsonl"))
    assert rewritten == [{"id": i, "completion": c} for i, c in enumerate(completions)]


def test_gsm8k_generates_with_the_hf_backend_then_rescoring_matches(tiny_model_dir, shared_data, tmp_path, repo_root):
    data_file = str(shared_data / "gsm8k" / "test.jsonl")
    output = tmp_path / "generated.json"
    run_script(
        repo_root,
        "math/eval_gsm8k.py",
        "--model",
        str(tiny_model_dir),
        "--backend",
        "hf",
        "--data_file",
        data_file,
        "--limit",
        "3",
        "--max_new_tokens",
        "8",
        "--output",
        str(output),
    )
    result = json.loads(output.read_text())
    assert (result["backend"], result["num_items"], result["limit"], result["model"]) == (
        "hf",
        3,
        3,
        str(tiny_model_dir),
    )
    assert result["generation"]["max_new_tokens"] == 8 and result["generation"]["temperature"] == 0.0
    assert result["protocol"] == "paper"  # the default: the authors' ten stop strings
    assert result["generation"]["stop"] == list(PAPER_STOP_STRINGS)
    assert all(record["completion"] for record in result["records"])
    rescored = run_task(
        gsm8k.TASKS["paper"],
        GeneratorArguments(),
        EvaluationArguments(
            data_file=data_file, predictions=str(tmp_path / "generated_predictions.jsonl"), allow_subset=True
        ),
        write=False,
    )
    assert rescored["records"] == result["records"]


def test_default_output_is_inside_the_model_directory(tmp_path, shared_data):
    model_dir = tmp_path / "run"
    model_dir.mkdir()
    data_file = write_rows(tmp_path / "data.jsonl", [{"question": "1+1?", "answer": "2\n#### 2"}])
    arguments = EvaluationArguments(data_file=data_file)
    backend = CallableBackend(lambda prompt: "The answer is: 2\n### Instruction: next")
    run_task(gsm8k.TASK, GeneratorArguments(model=str(model_dir)), arguments, backend=backend)
    result = json.loads((model_dir / "eval" / "gsm8k.json").read_text())
    assert result["accuracy"] == 1.0 and result["backend"] == "callable"
    assert result["records"][0]["completion"] == "The answer is: 2\n"
    assert (model_dir / "eval" / "gsm8k_predictions.jsonl").is_file()


def test_default_output_of_a_merged_copy_goes_to_its_run_directory(tmp_path):
    from tlora.evaluation.common import default_output_path

    (tmp_path / "run" / "merged").mkdir(parents=True)
    (tmp_path / "run" / "run_record.json").write_text("{}")
    assert default_output_path("math", str(tmp_path / "run" / "merged")) == str(tmp_path / "run" / "eval" / "math.json")
    assert default_output_path("math", str(tmp_path / "run")) == str(tmp_path / "run" / "eval" / "math.json")
    assert default_output_path("math", "org/model") == os.path.join(os.getcwd(), "eval_math.json")


def test_malformed_files_name_the_file_and_line(tmp_path):
    data_file = tmp_path / "data.jsonl"
    data_file.write_text('{"question": "q", "answer": "#### 1"}\n{"question": "q2", "answer": \n')
    with pytest.raises(DataFormatError, match=r"data.jsonl, line 2"):
        run_task(
            gsm8k.TASK, GeneratorArguments(), EvaluationArguments(data_file=str(data_file), predictions="x"),
            write=False,
        )
    data_file.write_text('{"question": "q", "answer": "#### 1"}\n{"query": "q2", "answer": "#### 2"}\n')
    with pytest.raises(DataFormatError, match=r"row 1 .*has \['answer', 'query'\]"):
        run_task(
            gsm8k.TASK, GeneratorArguments(), EvaluationArguments(data_file=str(data_file), predictions="x"),
            write=False,
        )
    data_file.write_text('{"question": "q", "answer": "1"}\n')
    with pytest.raises(DataFormatError, match="####"):
        run_task(
            gsm8k.TASK, GeneratorArguments(), EvaluationArguments(data_file=str(data_file), predictions="x"),
            write=False,
        )
    data_file.write_text('{"question": "q", "answer": "#### 1"}\n')
    for bad_row, message in (
        ({"id": 5, "completion": "1"}, "outside"),
        ({"id": "0", "completion": "1"}, "'id'"),
        ({"id": 0}, "'completion'"),
    ):
        predictions = write_rows(tmp_path / "bad.jsonl", [bad_row])
        with pytest.raises(DataFormatError, match=message):
            run_task(
                gsm8k.TASK,
                GeneratorArguments(),
                EvaluationArguments(data_file=str(data_file), predictions=predictions),
                write=False,
            )


def test_cli_requires_a_model_or_predictions(repo_root):
    with pytest.raises(SystemExit):
        run_script(repo_root, "math/eval_gsm8k.py", "--data_file", "x.jsonl")


# ---------------------------------------------------------------------------------------------------------------
# MATH


@pytest.mark.parametrize(
    ("completion", "gold", "correct"),
    [
        ("So x = 1/2.\nThe answer is: \\frac{1}{2}", "\\frac{1}{2}", True),
        ("The answer is: 0.5", "\\frac{1}{2}", True),
        ("The answer is: \\dfrac12", "\\frac{1}{2}", True),
        ("The answer is: \\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt3}{2}", True),
        ("The answer is: -3", "-3", True),
        ("The answer is: 3", "-3", False),
        ("The answer is: 1,000", "1000", True),
        ("The answer is: (-\\infty, 2]", "(-\\infty,2]", True),
        ("The answer is: 2, -5", "-5, 2", True),
        ("The answer is: $\\$115,000$.", "\\$115,000", True),
        ("The answer is: 120^\\circ", "120^\\circ", True),
        ("The answer is: \\text{(C)}", "\\text{(C)}", True),
        ("The answer is: x^2+2x+1", "(x+1)^2", True),
        ("The answer is: \\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", True),
        ("Thus the result is $\\boxed{7}$.", "7", True),  # no marker: math-verify reads the boxed answer
        ("I could not solve it.", "7", False),
        ("", "7", False),
    ],
)
def test_math_extraction_edge_cases(completion, gold, correct):
    assert math_answers.is_equivalent(gold, completion) is correct


def test_math_gold_is_the_last_balanced_boxed_answer():
    solution = "First $\\boxed{1}$, then the answer is $\\boxed{\\frac{a}{b^{2}}}$."
    assert math_answers.gold_answer(solution) == "\\frac{a}{b^{2}}"
    assert math_answers.last_boxed_content("\\boxed 5 apples") == "5"
    assert math_answers.last_boxed_content("\\fbox{x+1}") == "x+1"
    with pytest.raises(DataFormatError, match="boxed"):
        math_answers.gold_answer("no answer here", "row 3")


def math_gold_completions(rows, corrupt: bool = False) -> list[dict]:
    """Gold answers as completions in the paper's format (or the gold plus one)."""
    predictions = []
    for index, row in rows:
        gold = math_answers.gold_answer(row["solution"])
        answer = f"{gold}+1" if corrupt else gold
        predictions.append({"id": index, "completion": f"Let's solve it step by step.\nThe answer is: {answer}"})
    return predictions


def test_math_gold_completions_score_at_least_099_and_corrupted_score_zero(shared_data, tmp_path):
    data_file = str(shared_data / "math" / "test.jsonl")
    rows = read_jsonl(data_file)
    assert len(rows) == 5000
    sample = list(enumerate(rows))[::20]  # 250 problems across all subjects; the full set is in the closing note
    for corrupt, check in ((False, lambda value: value >= 0.99), (True, lambda value: value == 0.0)):
        predictions = write_rows(tmp_path / f"math_{corrupt}.jsonl", math_gold_completions(sample, corrupt))
        result = run_task(
            math_answers.TASK,
            GeneratorArguments(),
            EvaluationArguments(data_file=data_file, predictions=predictions),
            write=False,
        )
        assert result["num_items"] == len(sample)
        assert check(result["accuracy"]), result["accuracy"]


def test_math_cli_scores_predictions(shared_data, tmp_path, repo_root):
    data_file = str(shared_data / "math" / "test.jsonl")
    rows = read_jsonl(data_file)[:4]
    predictions = math_gold_completions(list(enumerate(rows)))
    predictions[3]["completion"] = "No idea."
    path = write_rows(tmp_path / "math_predictions_in.jsonl", predictions)
    output = tmp_path / "math.json"
    run_script(
        repo_root,
        "math/eval_math.py",
        "--predictions",
        path,
        "--data_file",
        data_file,
        "--output",
        str(output),
        "--protocol",
        "robust",
    )
    result = json.loads(output.read_text())
    assert (result["task"], result["accuracy"], result["num_items"]) == ("math", 0.75, 4)
    assert result["records"][0]["gold"] == "2" and result["records"][0]["extracted"] == "2"
    assert result["records"][3]["extracted"] is None
    assert os.path.isfile(tmp_path / "math_predictions.jsonl")


# ---------------------------------------------------------------------------------------------------------------
# Predictions files: empty, duplicated ids, ids outside the data (one check, common.check_prediction_ids)


def test_an_empty_predictions_file_is_an_error_not_zero_of_zero(tmp_path, repo_root):
    data_file = write_rows(tmp_path / "data.jsonl", [{"question": "q", "answer": "#### 1"}])
    predictions = tmp_path / "empty.jsonl"
    predictions.write_text("\n")
    for script in ("math/eval_gsm8k.py", "math/eval_math.py"):
        data = (
            data_file
            if script.endswith("gsm8k.py")
            else write_rows(tmp_path / "math.jsonl", [{"problem": "p", "solution": "$\\boxed{1}$"}])
        )
        with pytest.raises(DataFormatError, match=r"empty.jsonl holds no predictions \(an empty file\)"):
            run_script(
                repo_root,
                script,
                "--predictions",
                str(predictions),
                "--data_file",
                data,
                "--allow_subset",
                "--output",
                str(tmp_path / "out.json"),
            )
    assert not (tmp_path / "out.json").exists()


@pytest.mark.parametrize("task", [gsm8k.TASKS["paper"], math_answers.TASKS["robust"]], ids=["gsm8k", "math"])
def test_duplicated_and_unknown_prediction_ids_name_the_file_line_and_id(task, tmp_path):
    rows = (
        [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(3)]
        if task.name == "gsm8k"
        else [{"problem": f"p{i}", "solution": f"$\\boxed{{{i}}}$"} for i in range(3)]
    )
    data_file = write_rows(tmp_path / "data.jsonl", rows)
    arguments = {"data_file": data_file, "allow_subset": True, "protocol": task.protocol}
    duplicated = write_rows(
        tmp_path / "twice.jsonl",
        [{"id": 0, "completion": "The answer is: 0"}, {"id": 2, "completion": "a"}, {"id": 0, "completion": "b"}],
    )
    with pytest.raises(
        DataFormatError,
        match=r"twice.jsonl, line 3 \(row 2\): id 0 appears twice \(first at "
        r".*twice.jsonl, line 1 \(row 0\)\)",
    ):
        run_task(task, GeneratorArguments(), EvaluationArguments(predictions=duplicated, **arguments), write=False)
    unknown = write_rows(tmp_path / "unknown.jsonl", [{"id": 1, "completion": "a"}, {"id": 3, "completion": "b"}])
    with pytest.raises(
        DataFormatError,
        match=r"unknown.jsonl, line 2 \(row 1\): id 3 is outside the data file's "
        r"3 rows \(ids 0 to 2\)",
    ):
        run_task(task, GeneratorArguments(), EvaluationArguments(predictions=unknown, **arguments), write=False)
    # Predictions only for rows left out by --limit: nothing to score is an error, not 0/0.
    late = write_rows(tmp_path / "late.jsonl", [{"id": 2, "completion": "The answer is: 2"}])
    with pytest.raises(DataFormatError, match=r"late.jsonl has no prediction for any of the 1 rows evaluated"):
        run_task(task, GeneratorArguments(), EvaluationArguments(predictions=late, limit=1, **arguments), write=False)
