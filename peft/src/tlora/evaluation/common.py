"""Shared pieces of the scorers: data and predictions IO, command-line arguments, the evaluation loop, output files.

Every scorer works the same way: read the test rows, build one Alpaca prompt per row, get completions (from a
generation backend, or from a `--predictions` file without loading any model), extract an answer from each
completion, compare it with the gold answer, and write one JSON file with the headline accuracy and one record per
item, plus the generations as a predictions file that `--predictions` can score again.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from .protocols import (
    DEFAULT_PROTOCOL,
    PAPER,
    PAPER_STOP_STRINGS,
    PROTOCOLS,
    ROBUST,
    ROBUST_STOP_STRINGS,
    check_full_set,
    check_protocol,
    data_record,
    truncate_at_stop,
)

from ..constants import RUN_RECORD_FILE as RUN_RECORD_NAME
from ..data.rows import DataFormatError, RowSource, is_local_path, load_rows, read_rows

logger = logging.getLogger(__name__)

PREDICTIONS_SUFFIX = "_predictions.jsonl"


# ----------------------------------------------------------------------------------------------------------------
# Reading data: one reader for the whole project (tlora.data.rows); the scorers keep using these names.

read_jsonl = read_rows  # a predictions or data file as a list of row objects
read_json_rows = read_rows


def require_fields(rows: Sequence[Mapping], fields: Iterable[str], source: str) -> None:
    """Raise an error naming the file and row when a row lacks one of `fields`."""
    fields = list(fields)
    for index, row in enumerate(rows):
        missing = [name for name in fields if name not in row]
        if missing:
            raise DataFormatError(
                f"{source}, row {index} (line {index + 1} of a JSON-lines file): missing field(s) {missing}; "
                f"the row has {sorted(row)}. This scorer expects {fields}."
            )


# ----------------------------------------------------------------------------------------------------------------
# Predictions files


def check_prediction_ids(
    rows: RowSource,
    ids: Sequence[Hashable],
    known: Optional[Callable[[Hashable], bool]] = None,
    *,
    data: str = "the data file",
    describe: Callable[[Hashable], str] = lambda key: f"id {key!r}",
) -> None:
    """Raise a DataFormatError naming the file, line and id when a predictions file is empty, holds an id twice, or
    names an id that `known` says the data lacks (`ids[i]` is the id of `rows[i]`); one check for every task."""
    if not rows:
        raise DataFormatError(
            f"{rows.origin} holds no predictions (an empty file); pass the generations file the generation step "
            "wrote, one JSON object a line."
        )
    first_index: dict[Hashable, int] = {}
    for index, key in enumerate(ids):
        if known is not None and not known(key):
            raise DataFormatError(
                f"{rows.where(index)}: {describe(key)} is outside {data}; were these predictions made for other "
                "data? Pass the data they were generated from, or remove that line."
            )
        if key in first_index:
            raise DataFormatError(
                f"{rows.where(index)}: {describe(key)} appears twice (first at {rows.where(first_index[key])}); "
                "keep one prediction per item (a duplicate would be averaged or overwritten silently)."
            )
        first_index[key] = index


def read_predictions(path: str, num_rows: Any = None, *, with_task: bool = False) -> list[dict]:
    """The rows of a predictions file (`{"id", "completion"}` and `"task"` when `with_task`), checked; `num_rows` is
    the data file's row count (a dict of counts by task when `with_task`) for the range check."""
    rows = read_jsonl(path)
    for index, row in enumerate(rows):
        where = rows.where(index)
        if not isinstance(row.get("id"), int) or isinstance(row.get("id"), bool):
            raise DataFormatError(f"{where}: 'id' must be the 0-based row index in the data file (an integer).")
        if not isinstance(row.get("completion"), str):
            raise DataFormatError(f"{where}: 'completion' must be a string (the generated text).")
        if with_task and not isinstance(row.get("task"), str):
            raise DataFormatError(f"{where}: 'task' must name the commonsense task (for example \"boolq\").")

    def known(key: Hashable) -> bool:
        """Whether a (task, id) or id is a row of the data (ids of tasks not evaluated are not checked)."""
        task, index = key if with_task else (None, key)
        limit = num_rows.get(task) if isinstance(num_rows, Mapping) else num_rows
        return limit is None or 0 <= index < limit

    keys = [(row["task"], row["id"]) if with_task else row["id"] for row in rows]
    if isinstance(num_rows, Mapping):
        data = "the data files (" + ", ".join(f"{task}: {count} rows" for task, count in num_rows.items()) + ")"
    else:
        data = "the data file" if num_rows is None else f"the data file's {num_rows} rows (ids 0 to {num_rows - 1})"
    describe = (lambda key: f"task {key[0]!r} id {key[1]}") if with_task else (lambda key: f"id {key}")
    check_prediction_ids(rows, keys, known, data=data, describe=describe)
    return rows


def write_jsonl(path: str, rows: Iterable[Mapping]) -> None:
    """Write rows as JSON lines (UTF-8, non-ASCII kept)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def predictions_path(output_path: str) -> str:
    """The predictions file written beside an evaluation JSON (`eval/gsm8k.json` -> `eval/gsm8k_predictions.jsonl`)."""
    stem = output_path[:-5] if output_path.endswith(".json") else output_path
    return stem + PREDICTIONS_SUFFIX


# ----------------------------------------------------------------------------------------------------------------
# Command-line arguments (parsed with transformers.HfArgumentParser by the entry scripts)


@dataclass
class ModelArguments:
    """Which model generates the answers, and how."""

    model: Optional[str] = field(
        default=None,
        metadata={
            "help": "A merged model directory, an adapter directory (its base model is read from adapter_config.json "
            "and the adapter is merged on the fly) or a Hugging Face hub id. Not needed with --predictions."
        },
    )
    base_model: Optional[str] = field(
        default=None,
        metadata={"help": "Override the base model named in an adapter's adapter_config.json (a directory or hub id)."},
    )
    backend: str = field(
        default="auto",
        metadata={
            "help": "Generation backend: 'auto' (vLLM when installed and a GPU is present, else Hugging Face), "
            "'vllm' or 'hf'.",
            "choices": ["auto", "hf", "vllm"],
        },
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "Model dtype: 'auto' (as saved), 'bfloat16', 'float16' or 'float32'.",
            "choices": ["auto", "bfloat16", "float16", "float32"],
        },
    )
    device: Optional[str] = field(
        default=None, metadata={"help": "Device for the HF backend (default: 'cuda' when available, else 'cpu')."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow model and tokenizer code from the model repository to run."}
    )
    tensor_parallel_size: Optional[int] = field(
        default=None, metadata={"help": "vLLM tensor parallelism (default: the number of visible GPUs)."}
    )
    gpu_memory_utilization: float = field(default=0.9, metadata={"help": "Fraction of GPU memory vLLM may use."})
    merged_dir: Optional[str] = field(
        default=None,
        metadata={
            "help": "Where vLLM's merged copy of an adapter (or with --serve_adapter its export for vLLM) is written "
            "and reused (default: <adapter dir>/merged_for_vllm)."
        },
    )
    serve_adapter: bool = field(
        default=False,
        metadata={
            "help": "vLLM: serve the adapter unmerged (enable_lora, a LoRARequest) instead of merging it; an adapter "
            "with per-module ranks or alphas (TLoRA) is first exported as a plain LoRA (python -m tlora.export)."
        },
    )
    max_lora_rank: Optional[int] = field(
        default=None,
        metadata={
            "help": "vLLM max_lora_rank with --serve_adapter (1, 8, 16, 32, 64, 128, 256, 320 or 512; default: the "
            "smallest that holds the adapter's largest rank)."
        },
    )

    def backend_options(self) -> dict:
        """Keyword arguments for `make_backend`."""
        options: dict[str, Any] = {"base_model": self.base_model}
        if self.device is not None:
            options["device"] = self.device
        if self.tensor_parallel_size is not None:
            options["tensor_parallel_size"] = self.tensor_parallel_size
        options["gpu_memory_utilization"] = self.gpu_memory_utilization
        if self.merged_dir is not None:
            options["work_dir"] = self.merged_dir
        if self.serve_adapter:
            options["serve_adapter"] = True
        if self.max_lora_rank is not None:
            options["max_lora_rank"] = self.max_lora_rank
        return options


@dataclass
class ProtocolArguments:
    """Which evaluation protocol, and whether a partial test set is accepted."""

    protocol: str = field(
        default=DEFAULT_PROTOCOL,
        metadata={
            "help": "'paper': the authors' scripts (prompt, stop strings, token limit, full test set, answer reading, "
            "code clean-up), comparable with the paper's table; 'robust': this project's reading (not comparable).",
            "choices": list(PROTOCOLS),
        },
    )
    allow_subset: bool = field(
        default=False,
        metadata={
            "help": "Accept data or predictions that do not cover the full test set (GSM8K 1,319, MATH 5,000, "
            "HumanEval+ 164, MBPP+ 378 tasks); the result records a subset, never compared with the paper."
        },
    )


@dataclass
class EvaluationArguments(ProtocolArguments):
    """What to evaluate and where to write the results."""

    data_file: Optional[str] = field(
        default=None,
        metadata={
            "help": "The test set: a local .json/.jsonl file or a hub dataset id (default: the task's hub id; for "
            "commonsense, one task's test.json together with --tasks TASK)."
        },
    )
    predictions: Optional[str] = field(
        default=None,
        metadata={
            "help": 'Score this generations file (JSON lines {"id": row index, "completion": text}) instead of '
            "generating; no model is loaded."
        },
    )
    output: Optional[str] = field(
        default=None,
        metadata={
            "help": "Where to write the result JSON (default: <model dir>/eval/<task>.json for a local model, "
            "else ./eval_<task>.json). The generations are written beside it as <name>_predictions.jsonl."
        },
    )
    max_new_tokens: Optional[int] = field(
        default=None, metadata={"help": "Most new tokens per answer (default: the task's limit)."}
    )
    batch_size: int = field(default=16, metadata={"help": "Prompts per batch for the HF backend."})
    limit: Optional[int] = field(
        default=None, metadata={"help": "Evaluate only the first N rows (for smoke tests; the result says so)."}
    )
    seed: int = field(default=0, metadata={"help": "Random seed (decoding is greedy, so it rarely matters)."})


def default_output_path(task: str, model: Optional[str]) -> str:
    """`<run dir>/eval/<task>.json` for a local model directory, else `./eval_<task>.json`.

    The run dir is the model directory itself, or its parent when only the parent holds the training record
    (`--model RUN_DIR/merged`), so `python -m tlora.evaluation.report RUN_DIR` finds every evaluation of a run."""
    if model is not None and os.path.isdir(os.path.expanduser(model)):
        directory = os.path.abspath(os.path.expanduser(model))
        parent = os.path.dirname(directory)
        if not os.path.isfile(os.path.join(directory, RUN_RECORD_NAME)) and os.path.isfile(
            os.path.join(parent, RUN_RECORD_NAME)
        ):
            directory = parent
        return os.path.join(directory, "eval", f"{task}.json")
    return os.path.join(os.getcwd(), f"eval_{task}.json")


# ----------------------------------------------------------------------------------------------------------------
# The evaluation loop


@dataclass
class EvaluationItem:
    """One test question: its row index, prompt and gold answer (and the commonsense task it belongs to)."""

    id: int
    prompt: str
    gold: Any
    task: Optional[str] = None


def collect_completions(
    items: Sequence[EvaluationItem],
    model_arguments: ModelArguments,
    evaluation_arguments: EvaluationArguments,
    settings,
    *,
    backend=None,
    with_task: bool = False,
    num_rows: Any = None,
) -> tuple[dict, Optional[str]]:
    """Completions keyed by (task, id) or id: from `--predictions`, from `backend`, or from a backend for `--model`.

    `num_rows` is the full data file's row count (by task for commonsense): prediction ids outside it are errors,
    while predictions for rows left out by `--limit` or `--tasks` are ignored."""
    from .generation import backend_name, make_backend

    key = (lambda item: (item.task, item.id)) if with_task else (lambda item: item.id)
    if evaluation_arguments.predictions is not None:
        rows = read_predictions(evaluation_arguments.predictions, num_rows, with_task=with_task)
        completions = {((row["task"], row["id"]) if with_task else row["id"]): row["completion"] for row in rows}
        wanted = {key(item) for item in items}
        ignored = [name for name in completions if name not in wanted]
        if ignored:
            logger.info("Ignoring %d prediction(s) for rows not evaluated (--limit / --tasks)", len(ignored))
        return {name: text for name, text in completions.items() if name in wanted}, None
    if backend is None:
        if model_arguments.model is None:
            raise ValueError("Pass --model PATH to generate answers, or --predictions FILE to score existing ones.")
        backend = make_backend(
            model_arguments.model,
            model_arguments.backend,
            dtype=model_arguments.dtype,
            trust_remote_code=model_arguments.trust_remote_code,
            **model_arguments.backend_options(),
        )
    texts = backend.generate([item.prompt for item in items], settings)
    return {key(item): text for item, text in zip(items, texts)}, backend_name(backend)


def score_items(
    items: Sequence[EvaluationItem],
    completions: Mapping,
    judge: Callable[[str, EvaluationItem], tuple[Any, bool]],
    *,
    with_task: bool = False,
) -> list[dict]:
    """One record per item that has a completion: prompt, completion, extracted answer, gold, correct."""
    records = []
    for item in items:
        key = (item.task, item.id) if with_task else item.id
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


def build_result(
    task: str,
    records: list[dict],
    *,
    model: Optional[str],
    data_file: str,
    backend: Optional[str],
    settings=None,
    limit: Optional[int] = None,
    num_data_rows: Optional[int] = None,
    extra: Optional[dict] = None,
) -> dict:
    """The evaluation JSON: task, headline accuracy, counts, provenance, then one record per item."""
    from dataclasses import asdict

    result: dict[str, Any] = {
        "task": task,
        "accuracy": accuracy(records),
        "num_items": len(records),
        "num_correct": sum(bool(record["correct"]) for record in records),
        "model": model,
        "data_file": data_file,
        "backend": backend,
    }
    if num_data_rows is not None:
        result["num_data_rows"] = num_data_rows
    if limit is not None:
        result["limit"] = limit
    if settings is not None:
        result["generation"] = asdict(settings)
    if extra:
        result.update(extra)
    result["records"] = records
    return result


def write_result(
    result: dict, output_path: str, *, with_task: bool = False, source_predictions: Optional[str] = None
) -> None:
    """Write the evaluation JSON and, beside it, the generations as a predictions file (unless that file is the
    `--predictions` input being scored)."""
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    with open(output_path, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2, ensure_ascii=False)
        handle.write("\n")
    rows = []
    for record in result["records"]:
        row = {"id": record["id"], "completion": record["completion"]}
        if with_task:
            row["task"] = record["task"]
        rows.append(row)
    target = predictions_path(output_path)
    if source_predictions is None or os.path.abspath(source_predictions) != os.path.abspath(target):
        write_jsonl(target, rows)
    logger.info("Wrote %s (accuracy %.4f on %d items)", output_path, result["accuracy"], result["num_items"])


@dataclass
class TaskSpec:
    """How one single-file task (GSM8K, MATH) is evaluated under one protocol: data, prompts, decoding, judging."""

    name: str
    protocol: str
    default_data_file: str
    hub_config: Union[None, str, tuple[str, ...]]  # several configs are concatenated (MATH's seven subjects)
    field_names: tuple[tuple[str, ...], ...]  # accepted field sets; a row needs all fields of one of them
    max_new_tokens: int
    stop: tuple[str, ...]
    build_item: Callable[[int, dict], EvaluationItem]
    judge: Callable[[str, EvaluationItem], tuple[Any, bool]]  # completion, item -> (extracted answer, correct)


Judge = Callable[[str, EvaluationItem], tuple[Any, bool]]


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


def generation_settings(
    task_max_new_tokens: int, evaluation_arguments: EvaluationArguments, stop: Optional[Sequence[str]] = None
):
    """Greedy settings with the task's token limit (or --max_new_tokens) and stop strings (default: the robust ones)."""
    from .generation import GenerationSettings

    return GenerationSettings(
        max_new_tokens=evaluation_arguments.max_new_tokens or task_max_new_tokens,
        temperature=0.0,
        top_p=1.0,
        stop=list(ROBUST_STOP_STRINGS if stop is None else stop),
        batch_size=evaluation_arguments.batch_size,
        seed=evaluation_arguments.seed,
    )


def require_field_set(rows: Sequence[Mapping], field_names: Sequence[Sequence[str]], source: str) -> None:
    """Raise an error naming the file and row when a row has none of the accepted field sets."""
    for index, row in enumerate(rows):
        if not any(all(name in row for name in names) for names in field_names):
            raise DataFormatError(
                f"{source}, row {index} (line {index + 1} of a JSON-lines file): the row has {sorted(row)}, but this "
                f"scorer expects the fields {' or '.join(str(list(names)) for names in field_names)}."
            )


def load_task_rows(spec: TaskSpec, data_file: str) -> list[dict]:
    """The test rows of a single-file task (all configs of a multi-config hub set), checked for their fields."""
    configs: tuple = (None,)
    if data_file == spec.default_data_file:  # the task's own hub set, with its config(s)
        configs = spec.hub_config if isinstance(spec.hub_config, tuple) else (spec.hub_config,)
    rows = [row for config in configs for row in load_rows(data_file, hub_config=config, hub_split="test")]
    require_field_set(rows, spec.field_names, data_file)
    return rows


def cut_at_stop_strings(completions: Mapping, stop: Sequence[str]) -> tuple[dict, int]:
    """Completions cut at the stop strings as vLLM cut the authors' generations, and how many of them were cut."""
    cut = {key: truncate_at_stop(text, stop) for key, text in completions.items()}
    return cut, sum(cut[key] != text for key, text in completions.items())


def run_task(
    spec: TaskSpec,
    model_arguments: ModelArguments,
    evaluation_arguments: EvaluationArguments,
    *,
    backend=None,
    write: bool = True,
) -> dict:
    """Evaluate one single-file task end to end (generate or read predictions, score, write) and return the result."""
    data_file = evaluation_arguments.data_file or spec.default_data_file
    rows = load_task_rows(spec, data_file)
    num_data_rows = len(rows)
    subset = evaluation_arguments.allow_subset or evaluation_arguments.limit is not None
    if spec.protocol == PAPER:
        check_full_set(spec.name, num_data_rows, data_file, evaluation_arguments.allow_subset)
    if evaluation_arguments.limit is not None:
        rows = rows[: evaluation_arguments.limit]
    items = [spec.build_item(index, row) for index, row in enumerate(rows)]
    settings = generation_settings(spec.max_new_tokens, evaluation_arguments, spec.stop)
    completions, used_backend = collect_completions(
        items, model_arguments, evaluation_arguments, settings, backend=backend, num_rows=num_data_rows
    )
    extra: dict[str, Any] = {"protocol": spec.protocol}
    if evaluation_arguments.predictions is not None and spec.protocol == PAPER:
        completions, num_cut = cut_at_stop_strings(completions, spec.stop)
        extra["predictions_cut_at_stop_strings"] = {"stop": list(spec.stop), "num_cut": num_cut}
    records = score_items(items, completions, spec.judge)
    if evaluation_arguments.predictions is not None and not records:
        raise DataFormatError(
            f"{evaluation_arguments.predictions} has no prediction for any of the {len(items)} rows evaluated (ids 0 "
            f"to {len(items) - 1}); check --limit and that the predictions belong to {data_file}."
        )
    if evaluation_arguments.predictions is not None and len(records) < len(items):
        logger.warning(
            "%s covers %d of %d rows; accuracy is over the covered rows only",
            evaluation_arguments.predictions,
            len(records),
            len(items),
        )
    extra["data"] = data_record(data_file, len(records), spec.name, subset=subset)
    if evaluation_arguments.predictions:
        extra["predictions_file"] = evaluation_arguments.predictions
    result = build_result(
        spec.name,
        records,
        model=model_arguments.model,
        data_file=data_file,
        backend=used_backend,
        settings=None if evaluation_arguments.predictions else settings,
        limit=evaluation_arguments.limit,
        num_data_rows=num_data_rows,
        extra=extra,
    )
    if write:
        output = evaluation_arguments.output or default_output_path(spec.name, model_arguments.model)
        write_result(result, output, source_predictions=evaluation_arguments.predictions)
    return result


def configure_logging() -> None:
    """INFO-level logging for the entry scripts (library code only logs)."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """`--help` keeps the description's line breaks and shows defaults that are set (not `None`)."""

    def _get_help_string(self, action):
        """The option's help, with its default unless that is None."""
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def parse_arguments(dataclass_types: tuple, description: str, argv: Optional[Sequence[str]] = None) -> tuple:
    """Parse the command line into the given argument dataclasses (HfArgumentParser), checking model/predictions."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(dataclass_types, description=description, formatter_class=HelpFormatter)
    parsed = parser.parse_args_into_dataclasses(args=list(argv) if argv is not None else None)
    model_arguments = next(value for value in parsed if isinstance(value, ModelArguments))
    evaluation_arguments = next(value for value in parsed if isinstance(value, EvaluationArguments))
    if model_arguments.model is None and evaluation_arguments.predictions is None:
        parser.error("pass --model PATH to generate and score, or --predictions FILE to score existing generations")
    if evaluation_arguments.limit is not None and evaluation_arguments.limit < 1:
        parser.error("--limit must be a positive number of rows")
    return tuple(parsed)


def summary_line(result: dict) -> str:
    """A one-line summary of a result for the terminal (with its protocol and data source)."""
    data = result.get("data", {})
    return (
        f"{result['task']}: accuracy {result['accuracy']:.4f} ({result['num_correct']}/{result['num_items']} correct; "
        f"protocol {result.get('protocol')}, {data.get('source')}{', subset' if data.get('subset') else ''})"
    )


def main_for_task(tasks: Mapping[str, TaskSpec], description: str, argv: Optional[Sequence[str]] = None) -> dict:
    """The whole command line of a single-file task: parse arguments, pick the protocol, evaluate, write, print."""
    model_arguments, evaluation_arguments = parse_arguments((ModelArguments, EvaluationArguments), description, argv)
    configure_logging()
    result = run_task(tasks[check_protocol(evaluation_arguments.protocol)], model_arguments, evaluation_arguments)
    print(summary_line(result))
    return result


__all__ = [
    "DataFormatError",
    "TaskSpec",
    "generation_settings",
    "is_local_path",
    "load_task_rows",
    "main_for_task",
    "parse_arguments",
    "protocol_tasks",
    "run_task",
    "summary_line",
    "EvaluationArguments",
    "EvaluationItem",
    "ModelArguments",
    "ProtocolArguments",
    "accuracy",
    "build_result",
    "check_prediction_ids",
    "collect_completions",
    "cut_at_stop_strings",
    "configure_logging",
    "default_output_path",
    "load_rows",
    "predictions_path",
    "read_json_rows",
    "read_jsonl",
    "read_predictions",
    "require_field_set",
    "require_fields",
    "score_items",
    "write_jsonl",
    "write_result",
]
