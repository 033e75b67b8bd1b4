"""Commonsense reasoning (the LLM-Adapters protocol): eight multiple-choice tasks answered with answer words.

Each task's test file is `<data_dir>/<task>/test.json`, a list of `{"instruction", "input", "output", "answer"}`
objects from LLM-Adapters (these files are not a hub dataset, so a local folder is required). The prompt is the
Alpaca template on `instruction` (and `input` when non-empty); the model answers with a word such as `answer3`,
and the first answer word of the task's vocabulary in the completion is the prediction (case is ignored; an
answer with none is wrong). The headline accuracy is the unweighted mean of the per-task accuracies.

The authors published no commonsense evaluation script, so there is no `paper` protocol here: results record the
protocol `llm-adapters` (the reading above), and `--protocol` other than the default is refused.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Optional

from ..data.prompts import format_prompt
from .answers import AnswerEvaluation, EvaluationItem, accuracy, run_options
from .common import (
    DataFormatError,
    EvaluationArguments,
    GeneratorArguments,
    backend_for,
    read_json_rows,
    read_jsonl,
    require_fields,
)
from .generation import GenerationBackend, GenerationSettings, generation_settings
from .protocols import DEFAULT_PROTOCOL
from .task import TaskData, evaluate_task

logger = logging.getLogger(__name__)

PROTOCOL = "llm-adapters"
TASK_NAME = "commonsense"
MAX_NEW_TOKENS = 32
TEST_FILE_NAME = "test.json"

# The answer words of each task (LLM-Adapters' `extract_answer`); ARC, OpenBookQA and Social IQa share answer1-5.
ANSWER_WORDS: dict[str, tuple[str, ...]] = {
    "boolq": ("true", "false"),
    "piqa": ("solution1", "solution2"),
    "social_i_qa": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "hellaswag": ("ending1", "ending2", "ending3", "ending4"),
    "winogrande": ("option1", "option2"),
    "ARC-Easy": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "ARC-Challenge": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "openbookqa": ("answer1", "answer2", "answer3", "answer4", "answer5"),
}
TASKS: tuple[str, ...] = tuple(ANSWER_WORDS)
REQUIRED_FIELDS = ("instruction", "answer")

_ANSWER_PATTERNS = {
    task: re.compile("|".join(re.escape(word) for word in words), re.IGNORECASE) for task, words in ANSWER_WORDS.items()
}


def extract_answer(task: str, completion: str) -> Optional[str]:
    """The first answer word of `task` in the completion (lower case), or None."""
    if task not in _ANSWER_PATTERNS:
        raise ValueError(f"Unknown commonsense task {task!r}; the tasks are {', '.join(TASKS)}.")
    match = _ANSWER_PATTERNS[task].search(completion)
    return match.group(0).lower() if match else None


def judge(task: str, completion: str, gold: str) -> tuple[Optional[str], bool]:
    """The extracted answer word and whether it is the gold one."""
    extracted = extract_answer(task, completion)
    return extracted, extracted is not None and extracted == gold.strip().lower()


def parse_tasks(tasks: Optional[str]) -> list[str]:
    """The task list from a comma-separated string (all eight when empty), checked against the known names."""
    if not tasks:
        return list(TASKS)
    names = [name.strip() for name in tasks.split(",") if name.strip()]
    unknown = [name for name in names if name not in ANSWER_WORDS]
    if unknown:
        raise ValueError(f"Unknown commonsense task(s) {unknown}; choose from {', '.join(TASKS)}.")
    return names


def task_file(data_dir: str, task: str) -> str:
    """`<data_dir>/<task>/test.json`."""
    return os.path.join(os.path.expanduser(data_dir), task, TEST_FILE_NAME)


def load_task_rows(path: str, task: str) -> list[dict]:
    """The rows of one task's test file, checked for the fields and answer words it needs."""
    rows = read_json_rows(path)
    require_fields(rows, REQUIRED_FIELDS, path)
    words = set(ANSWER_WORDS[task])
    for index, row in enumerate(rows):
        if str(row["answer"]).strip().lower() not in words:
            raise DataFormatError(
                f"{path}, row {index}: answer {row['answer']!r} is not one of {task}'s answer words "
                f"{sorted(words)}; is this the {task} test file?"
            )
    return rows


def build_items(task: str, rows: Sequence[dict]) -> list[EvaluationItem]:
    """One evaluation item per row: the Alpaca prompt of `instruction` (+ `input`) and the gold answer word."""
    return [
        EvaluationItem(
            id=index,
            prompt=format_prompt(row["instruction"], row.get("input")),
            gold=str(row["answer"]).strip().lower(),
            task=task,
        )
        for index, row in enumerate(rows)
    ]


@dataclass
class CommonsenseArguments:
    """Which commonsense tasks to evaluate and where their files are."""

    data_dir: Optional[str] = field(
        default=None,
        metadata={
            "help": "Folder with the LLM-Adapters test files as <task>/test.json (required unless --data_file is given "
            "with a single task; these files are not a hub dataset)."
        },
    )
    tasks: Optional[str] = field(
        default=None,
        metadata={"help": f"Comma-separated tasks (default: all eight: {','.join(TASKS)})."},
    )


def task_files(commonsense_arguments: CommonsenseArguments, evaluation_arguments: EvaluationArguments) -> dict:
    """The test file of each requested task; every file must exist."""
    tasks = parse_tasks(commonsense_arguments.tasks)
    if evaluation_arguments.data_file is not None:
        if len(tasks) != 1:
            raise ValueError("--data_file names one task's test file: pass --tasks with exactly that task.")
        return {tasks[0]: os.path.expanduser(evaluation_arguments.data_file)}
    if commonsense_arguments.data_dir is None:
        raise ValueError(
            "Pass --data_dir: a folder with the LLM-Adapters test files as <task>/test.json "
            "(boolq, piqa, social_i_qa, hellaswag, winogrande, ARC-Easy, ARC-Challenge, openbookqa)."
        )
    files = {task: task_file(commonsense_arguments.data_dir, task) for task in tasks}
    missing = [task for task, path in files.items() if not os.path.isfile(path)]
    if missing:
        present = [task for task in tasks if task not in missing]
        raise FileNotFoundError(
            f"No test file for {missing} under {commonsense_arguments.data_dir} (expected <task>/{TEST_FILE_NAME}); "
            f"add the files or evaluate the others with --tasks {','.join(present)}."
        )
    return files


def check_prediction_tasks(path: str) -> None:
    """Fail when a predictions file names a task that is not one of the eight (a typo would silently score nothing)."""
    names = {row.get("task") for row in read_jsonl(path)}
    unknown = sorted(name for name in names if isinstance(name, str) and name not in ANSWER_WORDS)
    if unknown:
        raise DataFormatError(f"{path}: unknown task name(s) {unknown}; the tasks are {', '.join(TASKS)}.")


class CommonsenseEvaluation(AnswerEvaluation):
    """The commonsense `EvaluationTask`: the requested tasks' files, one answer word per row, per-task accuracies."""

    name = TASK_NAME
    protocol = PROTOCOL
    with_task = True

    def __init__(self, arguments: EvaluationArguments, commonsense_arguments: CommonsenseArguments) -> None:
        if arguments.protocol != DEFAULT_PROTOCOL:
            raise ValueError(
                f"Commonsense has one protocol ({PROTOCOL}: the first answer word of the task's vocabulary); the "
                "authors published no commonsense evaluation to reproduce. Leave out --protocol."
            )
        self.arguments, self.commonsense_arguments = arguments, commonsense_arguments

    def load_data(self) -> TaskData:
        """The items of every requested task (the first `--limit` rows of each), with each file's row count."""
        files = task_files(self.commonsense_arguments, self.arguments)
        items: list[EvaluationItem] = []
        num_rows, num_data_rows = {}, {}
        for task, path in files.items():
            rows = load_task_rows(path, task)
            num_data_rows[task] = len(rows)
            if self.arguments.limit is not None:
                rows = rows[: self.arguments.limit]
            num_rows[task] = len(rows)
            items.extend(build_items(task, rows))
        if self.arguments.predictions is not None:
            check_prediction_tasks(self.arguments.predictions)
        source = self.commonsense_arguments.data_dir or self.arguments.data_file
        subset = self.arguments.limit is not None or len(files) < len(TASKS)
        return TaskData(items, source, num_data_rows, subset, extra={"files": files, "num_rows": num_rows})

    def generation_settings(self) -> GenerationSettings:
        """Greedy, at most MAX_NEW_TOKENS (or --max_new_tokens) new tokens, the robust stop strings."""
        arguments = self.arguments
        return generation_settings(
            arguments.max_new_tokens or MAX_NEW_TOKENS, batch_size=arguments.batch_size, seed=arguments.seed
        )

    def judge(self, completion: str, item: EvaluationItem) -> tuple[Optional[str], bool]:
        """The item's task's answer word in the completion, and whether it is the gold one."""
        return judge(item.task, completion, item.gold)

    def check_coverage(self, data: TaskData, records: Sequence[Mapping]) -> None:
        """Fail when a predictions file covers no evaluated row (per-task gaps are warned in `metrics`)."""
        if not records:
            raise DataFormatError(
                f"{self.arguments.predictions} has no prediction for any row of the tasks evaluated "
                f"({', '.join(data.extra['files'])}); check --tasks and --limit."
            )

    def metrics(self, data: TaskData, records: Sequence[Mapping]) -> dict:
        """Per-task accuracies, their unweighted mean as the headline (as LLM-Adapters and the papers report it), the
        micro accuracy and the files read."""
        per_task = {}
        for task in data.extra["files"]:
            task_records = [record for record in records if record["task"] == task]
            if task_records:
                per_task[task] = {"accuracy": accuracy(task_records), "num_items": len(task_records)}
            expected = data.extra["num_rows"][task]
            if len(task_records) < expected:
                logger.warning("%s: %d of %d rows have a prediction", task, len(task_records), expected)
        data.subset = data.subset or len(per_task) < len(TASKS)
        return {
            "accuracy": sum(entry["accuracy"] for entry in per_task.values()) / len(per_task) if per_task else 0.0,
            "micro_accuracy": accuracy(records),
            "data_file": data.source,
            "tasks": per_task,
            "data_files": data.extra["files"],
        }


def run(
    model_arguments: GeneratorArguments,
    evaluation_arguments: EvaluationArguments,
    commonsense_arguments: CommonsenseArguments,
    *,
    backend: Optional[GenerationBackend] = None,
    write: bool = True,
) -> dict:
    """Evaluate the commonsense tasks end to end and return the result (per-task and mean accuracy)."""
    return evaluate_task(
        CommonsenseEvaluation(evaluation_arguments, commonsense_arguments),
        run_options(TASK_NAME, model_arguments, evaluation_arguments, write),
        backend=backend,
        make_backend=lambda: backend_for(model_arguments),
    )


__all__ = [
    "ANSWER_WORDS",
    "CommonsenseArguments",
    "CommonsenseEvaluation",
    "MAX_NEW_TOKENS",
    "PROTOCOL",
    "TASKS",
    "build_items",
    "extract_answer",
    "judge",
    "load_task_rows",
    "parse_tasks",
    "run",
    "task_file",
]
