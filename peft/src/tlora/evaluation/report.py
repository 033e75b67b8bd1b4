"""The paper's results tables from run directories: `python -m tlora.evaluation.report RUN_DIR... [--output F]`.

Each RUN_DIR holds the training record `run_record.json` (method, base model, trainable parameters) and evaluation
JSON files, in RUN_DIR itself or in RUN_DIR/eval/: any JSON object with a `"task"` and a headline `"accuracy"`
(GSM8K, MATH, commonsense; fractions), `"pass@1"` (HumanEval, MBPP; fractions) or `"score"` (MT-Bench, 1-10).
Runs of the same method on the same base model share one row (the paper trains one run per task family), so a
method's math run and code run fill GSM8K/MATH and HumanEval/MBPP of the same row. Percentages are printed with two
decimals as in the paper; `--with_paper` puts the paper's numbers (Llama-2-7B) under each of our rows.

Every number is printed with its protocol (`paper`, `robust`, ... or `unrecorded` for files written before
protocols were recorded), its item count, a subset mark, and for code the tests its `pass@1` counts; a Sources
section lists each number's data source. A column whose rows used different protocols says so in its header and in
a note. `--with_paper` shows a paper number under ours only where ours was measured with the `paper` protocol on the
full test set; elsewhere it shows `n/c` (not comparable) and the protocol ours used.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from ..constants import RUN_RECORD_FILE
from ..methods_table import method_display_names, normalized_method_key
from .protocols import PAPER, UNRECORDED

logger = logging.getLogger(__name__)

RUN_RECORD_NAME = RUN_RECORD_FILE
HEADLINE_KEYS = ("accuracy", "pass@1", "score")
MISSING = "–"
# How a code result's tests are named beside its number (`pass@1` counts the base tests either way).
TESTS_LABELS = {"evalplus base+plus": "EvalPlus base", "original asserts": "original asserts"}

# Main table: column title, evaluation task, headline key, whether the value is a fraction printed as a percentage.
MAIN_COLUMNS: tuple[tuple[str, str, str, bool], ...] = (
    ("GSM8K", "gsm8k", "accuracy", True),
    ("MATH", "math", "accuracy", True),
    ("HumanEval", "humaneval", "pass@1", True),
    ("MBPP", "mbpp", "pass@1", True),
    ("MT-Bench", "mt_bench", "score", False),
)
COMMONSENSE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("BoolQ", "boolq"),
    ("PIQA", "piqa"),
    ("SIQA", "social_i_qa"),
    ("HellaSwag", "hellaswag"),
    ("WinoGrande", "winogrande"),
    ("ARC-e", "ARC-Easy"),
    ("ARC-c", "ARC-Challenge"),
    ("OBQA", "openbookqa"),
)

# The method names as the paper prints them, keyed by a normalized spelling (lower case, no '-', '_' or ' '): from the
# method registry (tlora.methods_table).
METHOD_DISPLAY_NAMES = method_display_names()

# The paper's Table (Llama-2-7B; tlora-method.md): trainable parameters as printed, then percentages / MT-Bench score.
PAPER_RESULTS: dict[str, dict[str, Any]] = {
    "FULL": {"params": "6738M", "gsm8k": 52.31, "math": 8.08, "humaneval": 23.20, "mbpp": 38.60, "mt_bench": 4.75},
    "LoRA": {"params": "319.81M", "gsm8k": 44.80, "math": 6.18, "humaneval": 20.70, "mbpp": 35.70, "mt_bench": 4.76},
    "AdaLoRA": {"params": "319.84M", "gsm8k": 43.20, "math": 5.74, "humaneval": 20.70, "mbpp": 36.00, "mt_bench": 4.50},
    "LoRA+": {"params": "319.81M", "gsm8k": 48.67, "math": 6.92, "humaneval": 22.60, "mbpp": 35.40, "mt_bench": 4.69},
    "DoRA": {"params": "321.17M", "gsm8k": 45.10, "math": 5.96, "humaneval": 20.70, "mbpp": 36.00, "mt_bench": 4.70},
    "OLoRA": {"params": "319.81M", "gsm8k": 52.38, "math": 8.22, "humaneval": 22.00, "mbpp": 38.90, "mt_bench": 4.99},
    "PiSSA": {"params": "319.81M", "gsm8k": 53.44, "math": 7.40, "humaneval": 22.60, "mbpp": 38.60, "mt_bench": 5.00},
    "LoRA-GA": {"params": "319.81M", "gsm8k": 58.15, "math": 8.66, "humaneval": 23.20, "mbpp": 38.60, "mt_bench": 4.97},
    "CorDA": {"params": "319.81M", "gsm8k": 54.43, "math": 8.70, "humaneval": 21.30, "mbpp": 39.40, "mt_bench": 5.09},
    "TLoRA": {"params": "171.71M", "gsm8k": 56.34, "math": 9.08, "humaneval": 23.50, "mbpp": 40.20, "mt_bench": 5.17},
}
PAPER_BASE_MODEL = "meta-llama/Llama-2-7b-hf"


def display_method(method: str) -> str:
    """The paper's spelling of a method name (`tlora` -> `TLoRA`); unknown names are kept as given."""
    return METHOD_DISPLAY_NAMES.get(normalized_method_key(method), method)


def format_parameters(count: Optional[int]) -> str:
    """A parameter count as the paper prints it: `171.71M`, `6738M` from a billion on, `12.35K` below a million."""
    if count is None:
        return MISSING
    if count >= 1_000_000_000:
        return f"{count / 1e6:.0f}M"
    if count >= 1_000_000:
        return f"{count / 1e6:.2f}M"
    if count >= 1_000:
        return f"{count / 1e3:.2f}K"
    return str(count)


def _read_json(path: str) -> Optional[Any]:
    """The JSON in `path`, or None (with a warning) when it cannot be read."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        logger.warning("Skipping %s: %s", path, error)
        return None


@dataclass
class EvaluationEntry:
    """One evaluation file's headline number."""

    task: str
    metric: str
    value: float
    path: str
    num_items: Optional[int] = None
    tasks: Optional[dict] = None  # commonsense per-task results
    protocol: str = UNRECORDED
    data: dict = field(default_factory=dict)  # source, num_items, expected_items, subset
    tests: Optional[str] = None  # code: which tests `pass@1` counts

    @property
    def subset(self) -> bool:
        """Whether the number covers only part of the test set."""
        return bool(self.data.get("subset"))

    @property
    def comparable_with_paper(self) -> bool:
        """Whether the number was measured as the paper's are: the paper protocol on the full test set."""
        return self.protocol == PAPER and not self.subset

    def annotation(self) -> str:
        """What is printed beside the number: protocol, the tests behind a code score, item count, subset."""
        parts = [self.protocol]
        if self.tests:
            parts.append(TESTS_LABELS.get(self.tests, self.tests))
        count = self.data.get("num_items", self.num_items)
        if count is not None:
            parts.append(f"n={count}")
        if self.subset:
            parts.append("subset")
        return ", ".join(parts)


@dataclass
class RunResults:
    """What one run directory holds: its training record and its evaluation headlines by task."""

    run_dir: str
    method: str
    base_model: Optional[str]
    trainable_parameters: Optional[int]
    training_task: Optional[str]
    evaluations: dict[str, EvaluationEntry] = field(default_factory=dict)


def _headline(data: dict) -> Optional[tuple[str, float]]:
    """The headline metric name and value of an evaluation JSON, or None when it has none."""
    for key in HEADLINE_KEYS:
        value = data.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return key, float(value)
    return None


def find_evaluations(run_dir: str) -> dict[str, EvaluationEntry]:
    """The evaluation JSON files in `run_dir` and `run_dir/eval`, keyed by task (the newest file wins a tie)."""
    found: dict[str, EvaluationEntry] = {}
    candidates = []
    for folder in (run_dir, os.path.join(run_dir, "eval")):
        if os.path.isdir(folder):
            candidates += [
                os.path.join(folder, name)
                for name in sorted(os.listdir(folder))
                if name.endswith(".json") and name != RUN_RECORD_NAME
            ]
    candidates.sort(key=os.path.getmtime)
    for path in candidates:
        data = _read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("task"), str):
            continue
        headline = _headline(data)
        if headline is None:
            continue
        if data["task"] in found:
            logger.warning("%s: %s is evaluated twice; using the newer %s", run_dir, data["task"], path)
        found[data["task"]] = EvaluationEntry(
            task=data["task"],
            metric=headline[0],
            value=headline[1],
            path=path,
            num_items=data.get("num_items"),
            tasks=data.get("tasks") if isinstance(data.get("tasks"), dict) else None,
            protocol=str(data.get("protocol") or UNRECORDED),
            data=data.get("data") if isinstance(data.get("data"), dict) else {},
            tests=data.get("tests") if isinstance(data.get("tests"), str) else None,
        )
    return found


def read_run(run_dir: str) -> RunResults:
    """The training record and evaluation headlines of one run directory."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"{run_dir} is not a directory; pass training output folders (with {RUN_RECORD_NAME}).")
    record_path = os.path.join(run_dir, RUN_RECORD_NAME)
    record = _read_json(record_path) if os.path.isfile(record_path) else None
    if not isinstance(record, dict):
        logger.warning("%s has no readable %s; the row is named after the folder", run_dir, RUN_RECORD_NAME)
        record = {}
    evaluations = find_evaluations(run_dir)
    if not evaluations:
        logger.warning("%s holds no evaluation results (run the eval scripts first)", run_dir)
    trainable = record.get("trainable_parameters")
    return RunResults(
        run_dir=run_dir,
        method=display_method(str(record.get("method") or os.path.basename(os.path.normpath(run_dir)))),
        base_model=record.get("base_model"),
        trainable_parameters=int(trainable) if isinstance(trainable, (int, float)) else None,
        training_task=record.get("task"),
        evaluations=evaluations,
    )


def _format_value(value: Optional[float], as_percentage: bool) -> str:
    """A table cell: a fraction as a percentage with two decimals, a score with two decimals, or a dash."""
    if value is None:
        return MISSING
    return f"{value * 100:.2f}" if as_percentage else f"{value:.2f}"


def _group_runs(runs: Sequence[RunResults], tasks: set[str]) -> list[dict]:
    """Rows of one table: runs of the same method and base model that evaluated any of `tasks`, merged in order."""
    rows: dict[tuple, dict] = {}
    for run in runs:
        relevant = {task: entry for task, entry in run.evaluations.items() if task in tasks}
        if not relevant:
            continue
        row = rows.setdefault(
            (run.method, run.base_model),
            {"method": run.method, "base_model": run.base_model, "trainable_parameters": [], "runs": [], "results": {}},
        )
        row["runs"].append(run.run_dir)
        if run.trainable_parameters is not None and run.trainable_parameters not in row["trainable_parameters"]:
            row["trainable_parameters"].append(run.trainable_parameters)
        for task, entry in relevant.items():
            if task in row["results"]:
                logger.warning("%s on %s: results from several runs; using %s", run.method, task, entry.path)
            row["results"][task] = entry
    return list(rows.values())


def _row_identity(row: dict) -> dict:
    """The JSON fields that name a row: method, base model, trainable parameters, runs."""
    return {
        "method": row["method"],
        "base_model": row["base_model"],
        "trainable_parameters": row["trainable_parameters"],
        "trainable_parameters_text": _parameters_cell(row["trainable_parameters"]),
        "runs": row["runs"],
    }


def _parameters_cell(counts: list[int]) -> str:
    """The parameter cell of a row (several values when the merged runs differ, e.g. per-task TLoRA plans)."""
    return " / ".join(format_parameters(count) for count in counts) if counts else MISSING


def markdown_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def _cell(entry: Optional[EvaluationEntry], as_percentage: bool) -> str:
    """A table cell: the number and, beside it, how it was measured."""
    if entry is None:
        return MISSING
    return f"{_format_value(entry.value, as_percentage)} ({entry.annotation()})"


def _entry_json(entry: EvaluationEntry) -> dict:
    """The JSON form of one number with how it was measured."""
    return {
        "metric": entry.metric,
        "value": entry.value,
        "num_items": entry.num_items,
        "protocol": entry.protocol,
        "data": entry.data,
        "tests": entry.tests,
        "comparable_with_paper": entry.comparable_with_paper,
        "file": entry.path,
    }


def column_protocols(rows: Sequence[dict], task: str) -> dict[str, list[str]]:
    """The protocols used in one column, each with the methods that used it."""
    protocols: dict[str, list[str]] = {}
    for row in rows:
        if task in row["results"]:
            protocols.setdefault(row["results"][task].protocol, []).append(row["method"])
    return protocols


def main_table(runs: Sequence[RunResults], with_paper: bool = False) -> tuple[str, list[dict], list[str]]:
    """The math / code / chat table (Markdown), its rows as JSON-ready dicts, and notes on comparability."""
    rows = _group_runs(runs, {task for _, task, _, _ in MAIN_COLUMNS})
    header = ["Method", "Trainable Params"]
    notes = []
    for title, task, _, _ in MAIN_COLUMNS:
        protocols = column_protocols(rows, task)
        if len(protocols) > 1:
            header.append(f"{title} (mixed protocols)")
            used = "; ".join(f"{name} ({', '.join(methods)})" for name, methods in protocols.items())
            notes.append(f"{title}: the rows use different protocols, {used}; they are not comparable.")
        else:
            header.append(title)
    body, data = [], []
    used_paper = set()
    for row in rows:
        results = {task: row["results"].get(task) for _, task, _, _ in MAIN_COLUMNS}
        body.append(
            [row["method"], _parameters_cell(row["trainable_parameters"])]
            + [_cell(results[task], percent) for _, task, _, percent in MAIN_COLUMNS]
        )
        data.append(
            {
                **_row_identity(row),
                "results": {task: _entry_json(entry) for task, entry in row["results"].items()},
                "source": "ours",
            }
        )
        if with_paper and row["method"] in PAPER_RESULTS:
            body.append(_paper_cells(row["method"], row["results"]))
            used_paper.add(row["method"])
    if with_paper:
        for method in PAPER_RESULTS:
            if method not in used_paper:
                body.append(_paper_cells(method))
        data += [
            {"method": method, "base_model": PAPER_BASE_MODEL, "source": "paper", "protocol": PAPER, **values}
            for method, values in PAPER_RESULTS.items()
        ]
    return markdown_table(header, body), data, notes


def _paper_cells(method: str, ours: Optional[dict] = None) -> list[str]:
    """A table row with the paper's numbers for `method`; beside our row, only where ours is comparable."""
    paper = PAPER_RESULTS[method]
    cells = [f"{method} (paper)", paper["params"]]
    for _, task, _, _ in MAIN_COLUMNS:
        entry = (ours or {}).get(task)
        if entry is None or entry.comparable_with_paper:
            cells.append(f"{paper[task]:.2f}")
        else:
            cells.append(f"n/c (ours: {entry.protocol}{', subset' if entry.subset else ''})")
    return cells


def sources_section(rows: Sequence[dict]) -> str:
    """One line per number of ours: its protocol, data source and item count, and its file."""
    lines = []
    titles = {task: title for title, task, _, _ in MAIN_COLUMNS}
    for row in rows:
        if row.get("source") != "ours":
            continue
        for task, entry in row["results"].items():
            data = entry["data"]
            expected = data.get("expected_items")
            count = data.get("num_items", entry["num_items"])
            items = f"{count} of {expected} items" if expected else f"{count} items"
            tests = f"; tests: {entry['tests']}" if entry["tests"] else ""
            lines.append(
                f"- {row['method']}, {titles.get(task, task)}: protocol {entry['protocol']}; data "
                f"{data.get('source', 'unrecorded')}, {items}{', subset' if data.get('subset') else ''}{tests} "
                f"({entry['file']})"
            )
    return "\n".join(lines)


def commonsense_table(runs: Sequence[RunResults]) -> tuple[str, list[dict]]:
    """The commonsense table (eight tasks and their average; Markdown) and its rows as JSON-ready dicts."""
    rows = _group_runs(runs, {"commonsense"})
    header = ["Method", "Trainable Params"] + [title for title, _ in COMMONSENSE_COLUMNS] + ["Avg."]
    body, data = [], []
    for row in rows:
        entry = row["results"]["commonsense"]
        per_task = {task: values.get("accuracy") for task, values in (entry.tasks or {}).items()}
        complete = all(per_task.get(task) is not None for _, task in COMMONSENSE_COLUMNS)
        coverage = "" if complete else f", {len(per_task)}/8"
        average = f"{_format_value(entry.value, True)} ({entry.annotation()}{coverage})"
        body.append(
            [row["method"], _parameters_cell(row["trainable_parameters"])]
            + [_format_value(per_task.get(task), True) for _, task in COMMONSENSE_COLUMNS]
            + [average]
        )
        data.append(
            {
                **_row_identity(row),
                "tasks": per_task,
                "average": entry.value,
                "complete": complete,
                "protocol": entry.protocol,
                "data": entry.data,
                "file": entry.path,
            }
        )
    return markdown_table(header, body), data


def build_report(run_dirs: Sequence[str], with_paper: bool = False) -> dict:
    """Both tables for these run directories: Markdown text and JSON-ready rows."""
    runs = [read_run(run_dir) for run_dir in run_dirs]
    main_markdown, main_rows, notes = main_table(runs, with_paper=with_paper)
    sections = ["## Math, code and chat\n\n" + main_markdown]
    commonsense_markdown, commonsense_rows = commonsense_table(runs)
    if commonsense_rows:
        sections.append("## Commonsense reasoning (accuracy %)\n\n" + commonsense_markdown)
    legend = (
        "GSM8K, MATH, HumanEval, MBPP: % (pass@1 for code); MT-Bench: judge score (1-10). Beside each number: its "
        "protocol, for code the tests pass@1 counts, the item count n, and `subset` when it covers part of the set."
    )
    if with_paper:
        legend += (
            " Rows marked (paper) are the paper's Llama-2-7B numbers; n/c marks a column where ours was not measured "
            "with the paper protocol on the full test set."
        )
    sources = sources_section(main_rows)
    markdown = "\n\n".join(sections) + "\n\n" + legend + "\n"
    if notes:
        markdown += "\n" + "\n".join(f"**Not comparable:** {note}" for note in notes) + "\n"
    if sources:
        markdown += "\n### Sources\n\n" + sources + "\n"
    return {
        "main": main_rows,
        "commonsense": commonsense_rows,
        "notes": notes,
        "markdown": markdown,
        "run_dirs": list(run_dirs),
    }


@dataclass
class ReportArguments:
    """Arguments of `python -m tlora.evaluation.report`."""

    run_dirs: list[str] = field(
        default_factory=list,
        metadata={"help": "Training output folders (with run_record.json and evaluation JSONs in it or in eval/)."},
    )
    output: Optional[str] = field(default=None, metadata={"help": "Write the tables as JSON to this file."})
    markdown: Optional[str] = field(default=None, metadata={"help": "Also write the Markdown to this file."})
    with_paper: bool = field(default=False, metadata={"help": "Add the paper's Llama-2-7B numbers under our rows."})


def parse_arguments(argv: Optional[Sequence[str]] = None) -> ReportArguments:
    """Run directories are positional; the rest are HfArgumentParser options."""
    from transformers import HfArgumentParser

    from .common import HelpFormatter

    parser = HfArgumentParser(ReportArguments, description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("positional_run_dirs", nargs="*", metavar="RUN_DIR", help="Run directories to tabulate.")
    argv = list(sys.argv[1:] if argv is None else argv)
    # A bare boolean flag would swallow a following RUN_DIR as its value (HfArgumentParser's `nargs="?"` booleans).
    argv = [f"{value}=true" if value in ("--with_paper", "--with-paper") else value for value in argv]
    arguments, leftover = parser.parse_args_into_dataclasses(args=argv)
    arguments.run_dirs = list(leftover.positional_run_dirs) + list(arguments.run_dirs or [])
    if not arguments.run_dirs:
        parser.error("pass at least one run directory")
    return arguments


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Print the Markdown tables and write the JSON (and Markdown) files asked for."""
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    arguments = parse_arguments(argv)
    report = build_report(arguments.run_dirs, with_paper=arguments.with_paper)
    print(report["markdown"])
    if arguments.output:
        os.makedirs(os.path.dirname(os.path.abspath(arguments.output)), exist_ok=True)
        with open(arguments.output, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
            handle.write("\n")
    if arguments.markdown:
        with open(arguments.markdown, "w", encoding="utf-8") as handle:
            handle.write(report["markdown"])
    return report


if __name__ == "__main__":
    main()
