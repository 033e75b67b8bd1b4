"""Shared pieces of the evaluation tasks: data and predictions IO, the command-line arguments (one
`GeneratorArguments` for the model that generates, one backend helper), output paths.

The task interface and its runner are in `task.py`; the answer tasks (GSM8K, MATH, commonsense) in `answers.py`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from .generation import GenerationBackend, make_backend
from .protocols import DEFAULT_PROTOCOL, PROTOCOLS

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
class GeneratorArguments:
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


def backend_for(model_arguments: GeneratorArguments) -> GenerationBackend:
    """The generation backend for `--model` with the command line's backend, dtype and options."""
    if model_arguments.model is None:
        raise ValueError("Pass --model PATH (a merged model directory, an adapter directory or a hub id) to generate.")
    return make_backend(
        model_arguments.model,
        model_arguments.backend,
        dtype=model_arguments.dtype,
        trust_remote_code=model_arguments.trust_remote_code,
        **model_arguments.backend_options(),
    )


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


def require_field_set(rows: Sequence[Mapping], field_names: Sequence[Sequence[str]], source: str) -> None:
    """Raise an error naming the file and row when a row has none of the accepted field sets."""
    for index, row in enumerate(rows):
        if not any(all(name in row for name in names) for names in field_names):
            raise DataFormatError(
                f"{source}, row {index} (line {index + 1} of a JSON-lines file): the row has {sorted(row)}, but this "
                f"scorer expects the fields {' or '.join(str(list(names)) for names in field_names)}."
            )


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
    model_arguments = next(value for value in parsed if isinstance(value, GeneratorArguments))
    evaluation_arguments = next(value for value in parsed if isinstance(value, EvaluationArguments))
    if model_arguments.model is None and evaluation_arguments.predictions is None:
        parser.error("pass --model PATH to generate and score, or --predictions FILE to score existing generations")
    if evaluation_arguments.limit is not None and evaluation_arguments.limit < 1:
        parser.error("--limit must be a positive number of rows")
    return tuple(parsed)


__all__ = [
    "DataFormatError",
    "EvaluationArguments",
    "HelpFormatter",
    "GeneratorArguments",
    "ProtocolArguments",
    "backend_for",
    "check_prediction_ids",
    "configure_logging",
    "default_output_path",
    "is_local_path",
    "load_rows",
    "parse_arguments",
    "predictions_path",
    "read_json_rows",
    "read_jsonl",
    "read_predictions",
    "require_field_set",
    "require_fields",
    "write_jsonl",
]
