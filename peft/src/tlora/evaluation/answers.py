"""Answer tasks: one prompt per data row, one answer read from each completion and compared with the gold answer.

GSM8K and MATH (`TaskSpec`, one data file, a protocol each: `gsm8k.TASKS`, `math_answers.TASKS`) and commonsense
(`commonsense.CommonsenseEvaluation`, one file per sub-task) are `EvaluationTask`s built on `AnswerEvaluation`:
read the test rows, build one Alpaca prompt per row, get completions (from a backend, or from a `--predictions` file
without loading any model), extract an answer from each completion, compare it with the gold answer, and write the
result with the headline accuracy and one record per item, plus the generations as a predictions file that
`--predictions` can score again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

from .common import (
    EvaluationArguments,
    GeneratorArguments,
    backend_for,
    configure_logging,
    default_output_path,
    parse_arguments,
    read_predictions,
    require_field_set,
)
from .generation import GenerationBackend, GenerationSettings, generation_settings
from .protocols import PAPER, PAPER_STOP_STRINGS, ROBUST, ROBUST_STOP_STRINGS, check_full_set, check_protocol
from .protocols import truncate_at_stop
from .task import RunOptions, Scores, TaskData, evaluate_task
from ..data.rows import DataFormatError, load_rows

logger = logging.getLogger(__name__)


@dataclass
class EvaluationItem:
    """One test question: its row index, prompt and gold answer (and the commonsense task it belongs to)."""

    id: int
    prompt: str
    gold: Any
    task: Optional[str] = None


Judge = Callable[[str, EvaluationItem], tuple[Any, bool]]  # completion, item -> (extracted answer, correct)


def item_key(item: EvaluationItem, with_task: bool) -> Any:
    """The key of an item's prediction: (task, id) for multi-task data, else the row id."""
    return (item.task, item.id) if with_task else item.id


def score_items(
    items: Sequence[EvaluationItem], completions: Mapping, judge: Judge, *, with_task: bool = False
) -> list[dict]:
    """One record per item that has a completion: prompt, completion, extracted answer, gold, correct."""
    records = []
    for item in items:
        key = item_key(item, with_task)
        if key not in completions:
            continue
        completion = completions[key]
        extracted, correct = judge(completion, item)
        record: dict[str, Any] = {"id": item.id}
        if with_task:
            record["task"] = item.task
        record.update(prompt=item.prompt, completion=completion, extracted=extracted, gold=item.gold)
        record["correct"] = bool(correct)
        records.append(record)
    return records


def accuracy(records: Sequence[Mapping]) -> float:
    """The fraction of records marked correct (0.0 when there are none)."""
    return sum(bool(record["correct"]) for record in records) / len(records) if records else 0.0


def cut_at_stop_strings(completions: Mapping, stop: Sequence[str]) -> tuple[dict, int]:
    """Completions cut at the stop strings as vLLM cut the authors' generations, and how many of them were cut."""
    cut = {key: truncate_at_stop(text, stop) for key, text in completions.items()}
    return cut, sum(cut[key] != text for key, text in completions.items())


class AnswerEvaluation:
    """The steps every answer task shares; a task sets `name`, `protocol`, `arguments`, `with_task` and implements
    `load_data`, `judge` and `generation_settings` (and `metrics` for numbers beyond the accuracy)."""

    name: str
    protocol: str
    arguments: EvaluationArguments
    with_task: bool = False

    def judge(self, completion: str, item: EvaluationItem) -> tuple[Any, bool]:
        """The extracted answer and whether it is correct."""
        raise NotImplementedError

    def generate(self, data: TaskData, backend: GenerationBackend, settings: GenerationSettings) -> list[dict]:
        """One predictions row per item: its id (and task) and the completion."""
        texts = backend.generate([item.prompt for item in data.items], settings)
        return [self.prediction_row(item.id, text, item.task) for item, text in zip(data.items, texts, strict=True)]

    def prediction_row(self, item_id: int, completion: str, task: Optional[str]) -> dict:
        """A predictions-file row."""
        row: dict[str, Any] = {"id": item_id, "completion": completion}
        if self.with_task:
            row["task"] = task
        return row

    def read_predictions(self, path: str, data: TaskData) -> list[dict]:
        """The predictions of the evaluated rows (predictions for rows left out by `--limit` / `--tasks` ignored)."""
        rows = read_predictions(path, data.num_data_rows, with_task=self.with_task)
        wanted = {item_key(item, self.with_task) for item in data.items}
        kept = [row for row in rows if self.row_key(row) in wanted]
        if len(kept) < len(rows):
            logger.info("Ignoring %d prediction(s) for rows not evaluated (--limit / --tasks)", len(rows) - len(kept))
        return kept

    def row_key(self, row: Mapping) -> Any:
        """The key of a predictions row."""
        return (row["task"], row["id"]) if self.with_task else row["id"]

    def score(self, data: TaskData, predictions: Sequence[Mapping]) -> Scores:
        """Judge every item that has a prediction; the accuracy, counts and the task's own numbers."""
        completions = {self.row_key(row): row["completion"] for row in predictions}
        records = score_items(data.items, completions, self.judge, with_task=self.with_task)
        if self.arguments.predictions is not None:
            self.check_coverage(data, records)
        metrics = {"accuracy": accuracy(records), "num_correct": sum(bool(record["correct"]) for record in records)}
        metrics.update(self.metrics(data, records))
        kept = [self.prediction_row(record["id"], record["completion"], record.get("task")) for record in records]
        return Scores(metrics, records, len(records), predictions=kept)

    def check_coverage(self, data: TaskData, records: Sequence[Mapping]) -> None:
        """Fail when a predictions file covers none of the evaluated rows; warn when it covers only some."""
        if not records:
            raise DataFormatError(
                f"{self.arguments.predictions} has no prediction for any of the {len(data.items)} rows evaluated (ids "
                f"0 to {len(data.items) - 1}); check --limit, --tasks and that the predictions belong to {data.source}."
            )
        if len(records) < len(data.items):
            logger.warning(
                "%s covers %d of %d rows; accuracy is over the covered rows only",
                self.arguments.predictions,
                len(records),
                len(data.items),
            )

    def metrics(self, data: TaskData, records: Sequence[Mapping]) -> dict:
        """Numbers and provenance beyond the accuracy (none by default)."""
        return {}


@dataclass
class TaskSpec:
    """How one single-file task (GSM8K, MATH) is evaluated under one protocol: data, prompts, decoding, judging."""

    name: str
    protocol: str
    default_data_file: str
    hub_config: Union[None, str, tuple[str, ...]]  # several configs are concatenated (MATH's seven subjects)
    field_names: tuple[tuple[str, ...], ...]  # accepted field sets; a row needs all fields of one of them
    max_new_tokens: int
    full_set_size: Optional[int]  # the paper protocol scores exactly this many rows
    stop: tuple[str, ...]
    build_item: Callable[[int, dict], EvaluationItem]
    judge: Judge


def protocol_tasks(
    *,
    paper: tuple[Callable[[int, dict], EvaluationItem], Judge],
    robust: tuple[Callable[[int, dict], EvaluationItem], Judge],
    **shared: Any,
) -> dict[str, TaskSpec]:
    """A task's TaskSpec under each protocol: (build_item, judge) per protocol, the protocol's stop strings, and the
    fields both share (name, data, field names, token limit)."""
    return {
        PAPER: TaskSpec(protocol=PAPER, stop=PAPER_STOP_STRINGS, build_item=paper[0], judge=paper[1], **shared),
        ROBUST: TaskSpec(protocol=ROBUST, stop=ROBUST_STOP_STRINGS, build_item=robust[0], judge=robust[1], **shared),
    }


def load_task_rows(spec: TaskSpec, data_file: str) -> list[dict]:
    """The test rows of a single-file task (all configs of a multi-config hub set), checked for their fields."""
    configs: tuple = (None,)
    if data_file == spec.default_data_file:  # the task's own hub set, with its config(s)
        configs = spec.hub_config if isinstance(spec.hub_config, tuple) else (spec.hub_config,)
    rows = [row for config in configs for row in load_rows(data_file, hub_config=config, hub_split="test")]
    require_field_set(rows, spec.field_names, data_file)
    return rows


class SingleFileEvaluation(AnswerEvaluation):
    """A `TaskSpec` bound to a run's arguments: the `EvaluationTask` of GSM8K or MATH."""

    def __init__(self, spec: TaskSpec, arguments: EvaluationArguments) -> None:
        self.spec, self.arguments = spec, arguments
        self.name, self.protocol = spec.name, spec.protocol

    def load_data(self) -> TaskData:
        """The test rows as items (the full set under the paper protocol unless a subset is asked for)."""
        data_file = self.arguments.data_file or self.spec.default_data_file
        rows = load_task_rows(self.spec, data_file)
        num_data_rows = len(rows)
        if self.protocol == PAPER:
            check_full_set(self.name, self.spec.full_set_size, num_data_rows, data_file, self.arguments.allow_subset)
        if self.arguments.limit is not None:
            rows = rows[: self.arguments.limit]
        items = [self.spec.build_item(index, row) for index, row in enumerate(rows)]
        subset = self.arguments.allow_subset or self.arguments.limit is not None
        return TaskData(items, data_file, num_data_rows, subset, self.spec.full_set_size)

    def generation_settings(self) -> GenerationSettings:
        """Greedy, with the task's token limit (or --max_new_tokens) and the protocol's stop strings."""
        arguments = self.arguments
        return generation_settings(
            arguments.max_new_tokens or self.spec.max_new_tokens,
            self.spec.stop,
            batch_size=arguments.batch_size,
            seed=arguments.seed,
        )

    def judge(self, completion: str, item: EvaluationItem) -> tuple[Any, bool]:
        """The spec's judge."""
        return self.spec.judge(completion, item)

    def read_predictions(self, path: str, data: TaskData) -> list[dict]:
        """The predictions file's rows; under the paper protocol cut at the stop strings as vLLM cut them."""
        rows = super().read_predictions(path, data)
        if self.protocol == PAPER:
            cut, num_cut = cut_at_stop_strings({row["id"]: row["completion"] for row in rows}, self.spec.stop)
            rows = [{**row, "completion": cut[row["id"]]} for row in rows]
            data.extra["predictions_cut_at_stop_strings"] = {"stop": list(self.spec.stop), "num_cut": num_cut}
        return rows

    def metrics(self, data: TaskData, records: Sequence[Mapping]) -> dict:
        """The data file, its row count and (when cut) the stop-string cut of the predictions."""
        return {"data_file": data.source, "num_data_rows": data.num_data_rows, **data.extra}


def run_options(
    task: str, model_arguments: GeneratorArguments, arguments: EvaluationArguments, write: bool
) -> RunOptions:
    """The run options of an answer task: predictions, output (default beside the model) and limit."""
    output = (arguments.output or default_output_path(task, model_arguments.model)) if write else None
    return RunOptions(
        model=model_arguments.model, predictions=arguments.predictions, output=output, limit=arguments.limit
    )


def run_task(
    spec: TaskSpec,
    model_arguments: GeneratorArguments,
    evaluation_arguments: EvaluationArguments,
    *,
    backend: Optional[GenerationBackend] = None,
    write: bool = True,
) -> dict:
    """Evaluate one single-file task end to end (generate or read predictions, score, write) and return the result."""
    return evaluate_task(
        SingleFileEvaluation(spec, evaluation_arguments),
        run_options(spec.name, model_arguments, evaluation_arguments, write),
        backend=backend,
        make_backend=lambda: backend_for(model_arguments),
    )


def summary_line(result: dict) -> str:
    """A one-line summary of a result for the terminal (with its protocol and data source)."""
    data = result.get("data", {})
    return (
        f"{result['task']}: accuracy {result['accuracy']:.4f} ({result['num_correct']}/{result['num_items']} correct; "
        f"protocol {result.get('protocol')}, {data.get('source')}{', subset' if data.get('subset') else ''})"
    )


def main_for_task(tasks: Mapping[str, TaskSpec], description: str, argv: Optional[Sequence[str]] = None) -> dict:
    """The whole command line of a single-file task: parse arguments, pick the protocol, evaluate, write, print."""
    model_arguments, evaluation_arguments = parse_arguments(
        (GeneratorArguments, EvaluationArguments), description, argv
    )
    configure_logging()
    result = run_task(tasks[check_protocol(evaluation_arguments.protocol)], model_arguments, evaluation_arguments)
    print(summary_line(result))
    return result


__all__ = [
    "AnswerEvaluation",
    "EvaluationItem",
    "Judge",
    "SingleFileEvaluation",
    "TaskSpec",
    "accuracy",
    "cut_at_stop_strings",
    "load_task_rows",
    "main_for_task",
    "protocol_tasks",
    "run_task",
    "score_items",
    "summary_line",
]
