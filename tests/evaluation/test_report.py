"""`python -m tlora.evaluation.report`: the paper's tables from synthetic run directories."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Optional

import pytest
from tlora.evaluation import report


def make_run(root, name, method, trainable, evaluations, task="math", in_eval_dir=True):
    """A run directory with a run record and evaluation JSON files (given as {file name: content})."""
    run_dir = root / name
    (run_dir / "eval").mkdir(parents=True)
    record = {
        "method": method,
        "task": task,
        "base_model": "meta-llama/Llama-2-7b-hf",
        "trainable_parameters": trainable,
        "total_parameters": 6_738_415_616 + trainable,
    }
    (run_dir / "run_record.json").write_text(json.dumps(record))
    for file_name, content in evaluations.items():
        (run_dir / ("eval" if in_eval_dir else "") / file_name).write_text(json.dumps(content))
    return run_dir


def measured(protocol: str, source: str, count: int, expected: Optional[int], **more) -> dict:
    """The protocol and data fields an evaluation JSON records."""
    subset = expected is not None and count != expected
    data = {"source": source, "num_items": count, "expected_items": expected, "subset": subset}
    return {"protocol": protocol, "data": data, "num_items": count, **more}


@pytest.fixture
def runs(tmp_path):
    """TLoRA math + code + chat runs, a LoRA math run and a TLoRA commonsense run."""
    commonsense_tasks = {
        task: {"accuracy": 0.5 + index / 100, "num_items": 10}
        for index, task in enumerate(task for _, task in report.COMMONSENSE_COLUMNS)
    }
    return [
        make_run(
            tmp_path,
            "tlora_math",
            "tlora",
            171_714_560,
            {
                "gsm8k.json": {
                    "task": "gsm8k",
                    "accuracy": 0.563381,
                    **measured("paper", "openai/gsm8k", 1319, 1319),
                    "records": [],
                },
                "math.json": {"task": "math", "accuracy": 0.0908, **measured("paper", "MATH_test.jsonl", 5000, 5000)},
                "notes.json": {"comment": "not an evaluation"},
            },
        ),
        make_run(
            tmp_path,
            "tlora_code",
            "TLoRA",
            170_000_000,
            {
                "humaneval.json": {
                    "task": "humaneval",
                    "pass@1": 0.235,
                    "pass@1_plus": 0.2,
                    **measured("paper", "openai/openai_humaneval", 164, 164, tests="evalplus base+plus"),
                },
                "mbpp.json": {
                    "task": "mbpp",
                    "pass@1": 0.402,
                    **measured("paper", "google-research-datasets/mbpp", 378, 378, tests="evalplus base+plus"),
                },
            },
            task="code",
            in_eval_dir=False,
        ),
        make_run(
            tmp_path,
            "tlora_chat",
            "tlora",
            171_714_560,
            {"mt_bench.json": {"task": "mt_bench", "score": 5.17, **measured("paper", "question.jsonl", 80, 80)}},
            task="chat",
        ),
        make_run(
            tmp_path,
            "lora_math",
            "lora",
            319_815_680,
            {"gsm8k.json": {"task": "gsm8k", "accuracy": 0.448, **measured("robust", "gsm8k.jsonl", 1319, 1319)}},
        ),
        make_run(
            tmp_path,
            "tlora_commonsense",
            "tlora",
            44_000_000,
            {
                "commonsense.json": {
                    "task": "commonsense",
                    "accuracy": 0.535,
                    "tasks": commonsense_tasks,
                    **measured("llm-adapters", "commonsense", 80, None),
                }
            },
            task="commonsense",
        ),
    ]


TLORA_LINE = (
    "| TLoRA | 171.71M / 170.00M | 56.34 (paper, n=1319) | 9.08 (paper, n=5000) | 23.50 (paper, EvalPlus base, n=164) "
    "| 40.20 (paper, EvalPlus base, n=378) | 5.17 (paper, n=80) |"
)


@pytest.mark.parametrize(
    ("count", "text"),
    [
        (171_714_560, "171.71M"),
        (319_815_680, "319.82M"),
        (6_738_415_616, "6738M"),
        (12_345, "12.35K"),
        (512, "512"),
        (None, "–"),
    ],
)
def test_parameters_are_formatted_like_the_paper(count, text):
    assert report.format_parameters(count) == text


def test_runs_of_one_method_share_a_row_with_all_their_numbers(runs):
    result = report.build_report([str(run) for run in runs])
    lines = result["markdown"].splitlines()
    header = "| Method | Trainable Params | GSM8K (mixed protocols) | MATH | HumanEval | MBPP | MT-Bench |"
    assert header in lines
    assert TLORA_LINE in lines
    assert "| LoRA | 319.82M | 44.80 (robust, n=1319) | – | – | – | – |" in lines
    tlora = next(row for row in result["main"] if row["method"] == "TLoRA")
    assert tlora["trainable_parameters"] == [171_714_560, 170_000_000]
    assert tlora["results"]["gsm8k"]["value"] == pytest.approx(0.563381)
    assert tlora["results"]["humaneval"]["metric"] == "pass@1"
    assert tlora["results"]["humaneval"]["tests"] == "evalplus base+plus"
    assert tlora["results"]["gsm8k"]["protocol"] == "paper" and tlora["results"]["gsm8k"]["comparable_with_paper"]
    assert result["notes"] == [
        "GSM8K: the rows use different protocols, paper (TLoRA); robust (LoRA); they are not comparable."
    ]
    assert "**Not comparable:** GSM8K: the rows use different protocols" in result["markdown"]
    assert "- LoRA, GSM8K: protocol robust; data gsm8k.jsonl, 1319 of 1319 items (" in result["markdown"]
    assert "- TLoRA, MBPP: protocol paper; data google-research-datasets/mbpp, 378 of 378 items; tests: evalplus" in (
        result["markdown"]
    )
    assert len(tlora["runs"]) == 3


def test_commonsense_table_has_eight_tasks_and_the_average(runs):
    result = report.build_report([str(run) for run in runs])
    assert (
        "| Method | Trainable Params | BoolQ | PIQA | SIQA | HellaSwag | WinoGrande | ARC-e | ARC-c | OBQA | Avg. |"
        in result["markdown"]
    )
    assert (
        "| TLoRA | 44.00M | 50.00 | 51.00 | 52.00 | 53.00 | 54.00 | 55.00 | 56.00 | 57.00 "
        "| 53.50 (llm-adapters, n=80) |"
        in result["markdown"]
    )
    assert result["commonsense"][0]["complete"] is True


def test_with_paper_puts_the_papers_numbers_under_ours(runs):
    result = report.build_report([str(run) for run in runs], with_paper=True)
    lines = result["markdown"].splitlines()
    ours = lines.index(TLORA_LINE)
    assert lines[ours + 1] == "| TLoRA (paper) | 171.71M | 56.34 | 9.08 | 23.50 | 40.20 | 5.17 |"
    # Our LoRA GSM8K number used the robust protocol: the paper's number is not put beside it.
    ours = lines.index("| LoRA | 319.82M | 44.80 (robust, n=1319) | – | – | – | – |")
    assert lines[ours + 1] == "| LoRA (paper) | 319.81M | n/c (ours: robust) | 6.18 | 20.70 | 35.70 | 4.76 |"
    assert "| FULL (paper) | 6738M | 52.31 | 8.08 | 23.20 | 38.60 | 4.75 |" in lines
    assert "| LoRA-GA (paper) | 319.81M | 58.15 | 8.66 | 23.20 | 38.60 | 4.97 |" in lines
    assert sum(row["source"] == "paper" for row in result["main"]) == 10


def test_cli_prints_markdown_and_writes_json(runs, tmp_path, capsys):
    output = tmp_path / "table.json"
    markdown = tmp_path / "table.md"
    report.main([str(runs[0]), str(runs[3]), "--output", str(output), "--markdown", str(markdown)])
    printed = capsys.readouterr().out
    assert "| TLoRA | 171.71M | 56.34 (paper, n=1319) | 9.08 (paper, n=5000) | – | – | – |" in printed
    data = json.loads(output.read_text())
    assert [row["method"] for row in data["main"]] == ["TLoRA", "LoRA"]
    assert markdown.read_text() == data["markdown"]


def test_partial_commonsense_and_missing_records_are_marked(tmp_path):
    run_dir = tmp_path / "no_record"
    run_dir.mkdir()
    (run_dir / "commonsense.json").write_text(
        json.dumps({"task": "commonsense", "accuracy": 0.6, "tasks": {"boolq": {"accuracy": 0.6}}})
    )
    result = report.build_report([str(run_dir)])
    line = "| no_record | – | 60.00 | – | – | – | – | – | – | – | 60.00 (unrecorded, 1/8) |"
    assert line in result["markdown"]
    with pytest.raises(FileNotFoundError, match="not a directory"):
        report.build_report([str(tmp_path / "absent")])


def test_module_runs_as_a_command(runs):
    environment = dict(os.environ)
    process = subprocess.run(
        [sys.executable, "-m", "tlora.evaluation.report", "--with_paper", str(runs[3])],
        capture_output=True,
        text=True,
        timeout=300,
        env=environment,
    )
    assert process.returncode == 0, process.stderr[-2000:]
    assert "| LoRA | 319.82M | 44.80 (robust, n=1319) | – | – | – | – |" in process.stdout
    assert "| LoRA (paper) | 319.81M | n/c (ours: robust) | 6.18 | 20.70 | 35.70 | 4.76 |" in process.stdout


def test_subsets_and_unrecorded_protocols_are_never_compared_with_the_paper(tmp_path):
    make_run(
        tmp_path,
        "old",
        "lora",
        319_815_680,
        {
            "gsm8k.json": {"task": "gsm8k", "accuracy": 0.45, "num_items": 1319},  # written before protocols
            "math.json": {"task": "math", "accuracy": 0.06, **measured("paper", "MATH-500", 500, 5000)},
        },
    )
    result = report.build_report([str(tmp_path / "old")], with_paper=True)
    lines = result["markdown"].splitlines()
    ours = lines.index(
        "| LoRA | 319.82M | 45.00 (unrecorded, n=1319) | 6.00 (paper, n=500, subset) | – | – | – |"
    )
    assert lines[ours + 1] == (
        "| LoRA (paper) | 319.81M | n/c (ours: unrecorded) | n/c (ours: paper, subset) | 20.70 | 35.70 | 4.76 |"
    )
    lora = result["main"][0]["results"]
    assert not lora["gsm8k"]["comparable_with_paper"] and not lora["math"]["comparable_with_paper"]
