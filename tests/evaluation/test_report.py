"""`python -m tlora.evaluation.report`: the paper's tables from synthetic run directories."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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
                "gsm8k.json": {"task": "gsm8k", "accuracy": 0.563381, "num_items": 1319, "records": []},
                "math.json": {"task": "math", "accuracy": 0.0908, "num_items": 5000},
                "notes.json": {"comment": "not an evaluation"},
            },
        ),
        make_run(
            tmp_path,
            "tlora_code",
            "TLoRA",
            170_000_000,
            {
                "humaneval.json": {"task": "humaneval", "pass@1": 0.235, "pass@1_plus": 0.2},
                "mbpp.json": {"task": "mbpp", "pass@1": 0.402},
            },
            task="code",
            in_eval_dir=False,
        ),
        make_run(
            tmp_path,
            "tlora_chat",
            "tlora",
            171_714_560,
            {"mt_bench.json": {"task": "mt_bench", "score": 5.17}},
            task="chat",
        ),
        make_run(tmp_path, "lora_math", "lora", 319_815_680, {"gsm8k.json": {"task": "gsm8k", "accuracy": 0.448}}),
        make_run(
            tmp_path,
            "tlora_commonsense",
            "tlora",
            44_000_000,
            {"commonsense.json": {"task": "commonsense", "accuracy": 0.535, "tasks": commonsense_tasks}},
            task="commonsense",
        ),
    ]


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
    assert "| Method | Trainable Params | GSM8K | MATH | HumanEval | MBPP | MT-Bench |" in lines
    assert "| TLoRA | 171.71M / 170.00M | 56.34 | 9.08 | 23.50 | 40.20 | 5.17 |" in lines
    assert "| LoRA | 319.82M | 44.80 | – | – | – | – |" in lines
    tlora = next(row for row in result["main"] if row["method"] == "TLoRA")
    assert tlora["trainable_parameters"] == [171_714_560, 170_000_000]
    assert tlora["results"]["gsm8k"]["value"] == pytest.approx(0.563381)
    assert tlora["results"]["humaneval"]["metric"] == "pass@1"
    assert len(tlora["runs"]) == 3


def test_commonsense_table_has_eight_tasks_and_the_average(runs):
    result = report.build_report([str(run) for run in runs])
    assert (
        "| Method | Trainable Params | BoolQ | PIQA | SIQA | HellaSwag | WinoGrande | ARC-e | ARC-c | OBQA | Avg. |"
        in result["markdown"]
    )
    assert (
        "| TLoRA | 44.00M | 50.00 | 51.00 | 52.00 | 53.00 | 54.00 | 55.00 | 56.00 | 57.00 | 53.50 |"
        in result["markdown"]
    )
    assert result["commonsense"][0]["complete"] is True


def test_with_paper_puts_the_papers_numbers_under_ours(runs):
    result = report.build_report([str(run) for run in runs], with_paper=True)
    lines = result["markdown"].splitlines()
    ours = lines.index("| TLoRA | 171.71M / 170.00M | 56.34 | 9.08 | 23.50 | 40.20 | 5.17 |")
    assert lines[ours + 1] == "| TLoRA (paper) | 171.71M | 56.34 | 9.08 | 23.50 | 40.20 | 5.17 |"
    assert "| FULL (paper) | 6738M | 52.31 | 8.08 | 23.20 | 38.60 | 4.75 |" in lines
    assert "| LoRA-GA (paper) | 319.81M | 58.15 | 8.66 | 23.20 | 38.60 | 4.97 |" in lines
    assert sum(row["source"] == "paper" for row in result["main"]) == 10


def test_cli_prints_markdown_and_writes_json(runs, tmp_path, capsys):
    output = tmp_path / "table.json"
    markdown = tmp_path / "table.md"
    report.main([str(runs[0]), str(runs[3]), "--output", str(output), "--markdown", str(markdown)])
    printed = capsys.readouterr().out
    assert "| TLoRA | 171.71M | 56.34 | 9.08 | – | – | – |" in printed
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
    assert "| no_record | – | 60.00 | – | – | – | – | – | – | – | 60.00 (1/8) |" in result["markdown"]
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
    assert "| LoRA | 319.82M | 44.80 | – | – | – | – |" in process.stdout
    assert "| LoRA (paper) | 319.81M | 44.80 | 6.18 | 20.70 | 35.70 | 4.76 |" in process.stdout
