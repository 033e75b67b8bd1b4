"""The `paper` protocol reproduces the authors' scripts (prompts, stop strings, limits, data, answer reading) on real
rows of the public test sets, and every result records its protocol and data."""

from __future__ import annotations

import json

import pytest
from tlora.evaluation import gsm8k, math_answers, math_paper
from tlora.evaluation.answers import run_task
from tlora.evaluation.common import EvaluationArguments, GeneratorArguments, read_jsonl
from tlora.evaluation.generation import CallableBackend
from tlora.evaluation.protocols import PAPER_STOP_STRINGS

# The authors' prompt text (evaluate/math/eval_gsm8k.py and eval_math.py, `problem_prompt`), byte for byte.
AUTHORS_GSM8K_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response:"
)
AUTHORS_MATH_PROMPT = AUTHORS_GSM8K_PROMPT + " "


def score(task, data_file, completions, tmp_path, **arguments) -> dict:
    """Score `completions` (one per row, in order) against `data_file` under `task`'s protocol."""
    predictions = tmp_path / f"{task.name}_{task.protocol}.jsonl"
    predictions.write_text("".join(json.dumps({"id": i, "completion": c}) + "\n" for i, c in enumerate(completions)))
    evaluation = EvaluationArguments(data_file=str(data_file), predictions=str(predictions), **arguments)
    return run_task(task, GeneratorArguments(), evaluation, write=False)


@pytest.fixture(scope="module")
def gsm8k_rows(shared_data):
    """The real GSM8K test set (1,319 rows) and its path."""
    path = shared_data / "gsm8k" / "test.jsonl"
    return path, read_jsonl(str(path))


@pytest.fixture(scope="module")
def math_rows(shared_data):
    """The real MATH test set (5,000 rows) and its path."""
    path = shared_data / "math" / "test.jsonl"
    return path, read_jsonl(str(path))


def test_paper_prompts_and_stop_strings_are_the_authors(gsm8k_rows, math_rows):
    (_, gsm8k_data), (_, math_data) = gsm8k_rows, math_rows
    item = gsm8k.TASKS["paper"].build_item(0, gsm8k_data[0])
    assert item.prompt == AUTHORS_GSM8K_PROMPT.format(instruction=gsm8k_data[0]["question"]) and item.gold == 18
    item = math_answers.TASKS["paper"].build_item(0, math_data[0])
    assert item.prompt == AUTHORS_MATH_PROMPT.format(instruction=math_data[0]["problem"])
    assert item.prompt.endswith("### Response: ")
    for task, tokens in ((gsm8k.TASKS["paper"], 512), (math_answers.TASKS["paper"], 1024)):
        assert task.stop == PAPER_STOP_STRINGS and len(task.stop) == 10 and task.max_new_tokens == tokens
    assert math_answers.TASKS["robust"].max_new_tokens == 1024  # both MATH protocols score the paper's limit


def test_gsm8k_paper_reading_on_all_real_rows(gsm8k_rows, tmp_path):
    path, rows = gsm8k_rows
    golds = [int(row["answer"].split("#### ")[1].replace(",", "")) for row in rows]
    paper, robust = gsm8k.TASKS["paper"], gsm8k.TASKS["robust"]

    exact = [f"Step by step.\nThe answer is: {gold}" for gold in golds]
    assert score(paper, path, exact, tmp_path)["accuracy"] == 1.0
    # `round()` of the authors' reading: x.4 reads as x (right for the paper, wrong for exact comparison).
    rounded = [f"The answer is: {gold}.4" for gold in golds]
    assert score(paper, path, rounded, tmp_path)["accuracy"] == 1.0
    assert score(robust, path, rounded, tmp_path, protocol="robust")["accuracy"] == 0.0
    # The authors need `The answer is: ` exactly; the robust reading takes any case and falls back to the last number.
    loose = [f"the answer is {gold}" if index % 2 else f"So {gold} in all." for index, gold in enumerate(golds)]
    result = score(paper, path, loose, tmp_path)
    assert result["accuracy"] == 0.0 and all(record["extracted"] is None for record in result["records"])
    assert score(robust, path, loose, tmp_path)["accuracy"] == 1.0
    # Thousands separators: the authors' pattern stops after one group, so 1,234,567 reads as 1234.
    big = [index for index, gold in enumerate(golds) if gold >= 1_000_000]
    assert big, "the GSM8K test set has answers of a million or more"
    completions = [f"The answer is: {gold:,}" for gold in golds]
    result = score(paper, path, completions, tmp_path)
    wrong = [record["id"] for record in result["records"] if not record["correct"]]
    assert wrong == big
    groups = f"{golds[big[0]]:,}".split(",")
    assert result["records"][big[0]]["extracted"] == int(groups[0] + groups[1])


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("The answer is: 3/4", 1),  # 0.75 rounds to 1
        ("The answer is: 5/0", 5),  # a zero denominator keeps the numerator
        ("The answer is: 2.5", 2),  # Python rounds half to even
        ("The answer is: -7 dollars", -7),
        ("The answer is: $1,450", 1450),
        ("The answer is:18", None),  # no space after the colon: no marker
        ("The Answer is: 18", None),
        ("The answer is: eighteen", None),
        ("The answer is: 3 The answer is: 4", 4),  # the last marker wins
    ],
)
def test_gsm8k_paper_reading_rules(completion, expected):
    assert gsm8k.paper_extract_answer(completion) == expected


def test_math_paper_reading_on_all_real_rows(math_rows, tmp_path):
    path, rows = math_rows
    golds = [math_paper.gold_answer(row["solution"]) for row in rows]
    assert None not in golds
    result = score(math_answers.TASKS["paper"], path, [f"Thus.\nThe answer is: {gold}" for gold in golds], tmp_path)
    assert result["num_items"] == 5000 and result["data"]["subset"] is False
    # One gold answer ends with a period inside its box, which the authors' reading strips from the prediction only.
    assert [record["id"] for record in result["records"] if not record["correct"]] == [2269]
    assert golds[2269].endswith("i.")


def test_math_paper_and_robust_readings_differ_as_the_authors_code_does(math_rows, tmp_path):
    path, rows = math_rows
    halves = [index for index, row in enumerate(rows) if math_paper.gold_answer(row["solution"]) == "\\frac{1}{2}"]
    assert len(halves) == 34
    index = halves[0]
    cases = {
        "The answer is: 0.5": (True, True),  # the authors' one numeric rule: 0.5 -> \frac{1}{2}
        "The answer is: 1/2.\n\nDone": (True, True),  # a/b -> \frac{a}{b}, cut at `.\n`
        "The answer is: \\dfrac12": (True, True),
        "The answer is: \\frac{2}{4}": (False, True),  # string equality, not symbolic equality
        "The answer is: 0.50": (False, True),
        "the answer is: 1/2": (False, True),  # case matters for the authors
        "Hence $\\boxed{\\frac12}$": (False, True),  # no marker: the authors score it wrong
    }
    for completion, (paper_correct, robust_correct) in cases.items():
        paper_item = math_answers.TASKS["paper"].build_item(index, rows[index])
        robust_item = math_answers.TASKS["robust"].build_item(index, rows[index])
        assert math_answers.TASKS["paper"].judge(completion, paper_item)[1] is paper_correct, completion
        assert math_answers.TASKS["robust"].judge(completion, robust_item)[1] is robust_correct, completion


@pytest.mark.parametrize(
    ("prediction", "gold", "equal"),
    [
        ("10 \\text{ cm}", "10", True),  # units after `\text{ ` are dropped
        ("5 \\text{ cm} \\text{ m}", "5", False),  # two units: normalising fails, raw strings differ
        ("x/y", "x/y", True),  # a lone slash between non-integers: raw strings compared
        ("k = 7", "7", True),  # a short left-hand side is dropped
        ("\\left( 1, 2 \\right)", "(1,2)", True),
        ("90^\\circ", "90", True),
        ("\\sqrt3", "\\sqrt{3}", True),
        (".5", "\\frac{1}{2}", True),  # `.5` -> `0.5` comes before the `0.5` -> `\frac{1}{2}` rule
        ("\\frac{1}{3}", "1/3", True),
        ("\\sqrt", "\\sqrt", True),  # `\sqrt` at the end fails to normalise: raw strings compared
    ],
)
def test_math_paper_normalisation_rules(prediction, gold, equal):
    assert math_paper.is_equivalent(prediction, gold) is equal


def test_paper_protocol_refuses_a_partial_test_set_unless_asked(math_rows, tmp_path):
    path, rows = math_rows
    partial = tmp_path / "math500.jsonl"
    partial.write_text("".join(json.dumps(row) + "\n" for row in rows[:500]))
    backend = CallableBackend(lambda prompt: "The answer is: 2")
    with pytest.raises(ValueError, match=r"holds 500 math items.*all 5000.*--allow_subset"):
        run_task(
            math_answers.TASKS["paper"], GeneratorArguments(), EvaluationArguments(data_file=str(partial)),
            backend=backend,
        )
    result = run_task(
        math_answers.TASKS["paper"],
        GeneratorArguments(),
        EvaluationArguments(data_file=str(partial), allow_subset=True),
        backend=backend,
        write=False,
    )
    assert result["protocol"] == "paper"
    assert result["data"] == {"source": str(partial), "num_items": 500, "expected_items": 5000, "subset": True}
    assert result["generation"]["stop"] == list(PAPER_STOP_STRINGS) and result["generation"]["max_new_tokens"] == 1024
    # The robust protocol scores any file, and records it.
    result = run_task(
        math_answers.TASKS["robust"],
        GeneratorArguments(),
        EvaluationArguments(data_file=str(partial), protocol="robust"),
        backend=backend,
        write=False,
    )
    assert (result["protocol"], result["data"]["num_items"], result["data"]["subset"]) == ("robust", 500, True)


def test_the_default_protocol_is_the_papers(repo_root, gsm8k_rows, tmp_path):
    import subprocess
    import sys

    path, rows = gsm8k_rows
    predictions = tmp_path / "p.jsonl"
    rows_out = [json.dumps({"id": index, "completion": "The answer is: 18.4"}) + "\n" for index in range(1319)]
    predictions.write_text("".join(rows_out))
    output = tmp_path / "gsm8k.json"
    process = subprocess.run(
        [sys.executable, "math/eval_gsm8k.py", "--predictions", str(predictions), "--data_file", str(path)]
        + ["--output", str(output)],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert process.returncode == 0, process.stderr[-2000:]
    result = json.loads(output.read_text())
    assert result["protocol"] == "paper" and result["data"]["num_items"] == 1319 and not result["data"]["subset"]
    golds = [int(row["answer"].split("#### ")[1].replace(",", "")) for row in rows]
    assert result["num_correct"] == golds.count(18)


# ---------------------------------------------------------------------------------------------------------------
# Where `--protocol paper` used to differ from the authors' scoring, item by item


def small_data(tmp_path, rows) -> str:
    """A small data file (scored with allow_subset) and its path."""
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_paper_cuts_predictions_at_the_authors_stop_strings_as_vllm_did(tmp_path):
    # vLLM cut the authors' generations at the earliest of their ten stop strings; a predictions file written
    # elsewhere may run past one, and its text after the stop string never reached their scorer.
    data = small_data(tmp_path, [{"question": "q", "answer": "#### 15"}, {"question": "q", "answer": "#### 7"}])
    completions = [
        "5 + 10 = 15.\nThe answer is: 15\nASSISTANT The answer is: 999",
        "The answer is: 7 USER: and Question: The answer is: 8",  # the earliest stop string (USER:) cuts
    ]
    result = score(gsm8k.TASKS["paper"], data, completions, tmp_path, allow_subset=True)
    assert [record["extracted"] for record in result["records"]] == [15, 7]
    assert result["accuracy"] == 1.0
    assert result["predictions_cut_at_stop_strings"] == {"stop": list(PAPER_STOP_STRINGS), "num_cut": 2}
    assert result["records"][0]["completion"] == "5 + 10 = 15.\nThe answer is: 15\n"
    # The robust protocol reads the completion as written (the last marker), as before.
    robust = score(gsm8k.TASKS["robust"], data, completions, tmp_path, protocol="robust")
    assert [record["extracted"] for record in robust["records"]] == ["999", "8"]
    assert "predictions_cut_at_stop_strings" not in robust

    data = small_data(tmp_path, [{"problem": "p", "solution": "So $\\boxed{5}$."}])
    result = score(
        math_answers.TASKS["paper"], data, ["The answer is: 5\nResponse: The answer is: 6"], tmp_path, allow_subset=True
    )
    assert result["records"][0]["extracted"] == "5" and result["accuracy"] == 1.0
    assert result["predictions_cut_at_stop_strings"]["num_cut"] == 1


def test_math_paper_removes_a_percent_sign_twice_like_the_authors_strip_string():
    # Their `replace("\\%", "")` then `replace("\%", "")` is one string removed twice: `3\\\%%` -> `3\%` -> `3`.
    written = "3\\\\\\%%"
    assert len(written) == 6 and written.count("\\") == 3
    assert math_paper.normalize(written) == "3"
    assert math_paper.is_equivalent(written, "3") is True
    assert math_paper.judge(f"The answer is: {written}", "3") == (written, True)
    assert math_paper.normalize("50\\%") == "50"


@pytest.mark.parametrize(
    ("completion", "authors", "exact"),
    [
        # exactly N + 0.5: the PyPI package `fraction` parses each part through a float and divides in floats
        ("The answer is: 8893491182460551/2", 4446745591230275, 4446745591230276),
        ("The answer is: 1893112632741960069/2", 946556316370980224, 946556316370980096),
    ],
)
def test_gsm8k_paper_reads_fractions_with_the_authors_fraction_package(completion, authors, exact):
    from fractions import Fraction

    import fraction as fraction_package

    text = completion.split(": ")[1]
    value = fraction_package.Fraction(text)
    assert round(float(value.numerator / value.denominator)) == authors  # their code's arithmetic, by the package
    assert round(Fraction(text)) != authors and round(float(Fraction(text))) == exact  # exact arithmetic differs
    assert gsm8k.paper_extract_answer(completion) == authors
    assert gsm8k.paper_judge(completion, authors) == (authors, True)
    assert gsm8k.judge(completion, str(authors))[1] is False  # robust: exact rationals, unchanged


@pytest.mark.parametrize(
    "number",
    [
        "5/00",  # `fraction` raises on the zero denominator (only `5/0` is special-cased by their script)
        "-" + "9" * 400,  # float('-inf'): their check catches +inf only, then round() overflows
        "9" * 400 + "/0",  # round(float(numerator)) overflows
        "9" * 400 + "/3",  # the `fraction` package overflows
    ],
)
def test_gsm8k_paper_scores_wrong_where_the_authors_script_stops_with_an_error(number, tmp_path, caplog):
    completion = f"So.\nThe answer is: {number}"
    with caplog.at_level("WARNING", logger="tlora.evaluation.gsm8k"):
        assert gsm8k.paper_extract_answer(completion) is None
    assert "stops with an error" in caplog.text
    data = small_data(tmp_path, [{"question": "q", "answer": "#### 5"}, {"question": "q", "answer": "#### 2"}])
    result = score(gsm8k.TASKS["paper"], data, [completion, "The answer is: 2"], tmp_path, allow_subset=True)
    assert [(record["extracted"], record["correct"]) for record in result["records"]] == [(None, False), (2, True)]
    assert result["accuracy"] == 0.5
