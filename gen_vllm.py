"""Generate HumanEval and MBPP completions (vLLM on GPUs, Hugging Face `generate` otherwise).

    python gen_vllm.py --model output/code-tlora                      # both tasks, backend auto
    python gen_vllm.py --model output/code-tlora --tasks humaneval --backend hf

Generates for EvalPlus's task sets (HumanEval+ 164, MBPP+ 378 tasks; the MBPP+ ids come from EvalPlus's data file:
MBPP_OVERRIDE_PATH or EvalPlus's cache) and fails if the test data lacks any of them, unless --allow_subset.
`--protocol paper` (default) decodes as the authors' gen_vllm.py (no stop strings, 1,024 tokens) and applies their
clean-up; `--protocol robust` stops at the Alpaca stop strings and keeps indentation.

Writes `<model dir>/eval/<task>_predictions.jsonl` (or `./eval_<task>_predictions.jsonl` for a hub id): one row per
problem with `task_id`, `prompt`, `raw_completion` and the post-processed `completion`; score them with
`python code/eval_code.py --dataset <task> --predictions FILE`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from transformers import HfArgumentParser

from tlora.evaluation.code import MAX_NEW_TOKENS, code_generation_settings, generate_code_file
from tlora.evaluation.code_data import DATASETS, tasks_to_generate
from tlora.evaluation.common import (
    GeneratorArguments,
    ProtocolArguments,
    backend_for,
    configure_logging,
    default_output_path,
    predictions_path,
)


@dataclass
class CodeGenerationArguments:
    """Which code tasks to generate for, from which test files, and where to write the generations."""

    tasks: str = field(default="humaneval,mbpp", metadata={"help": "Comma-separated tasks: humaneval, mbpp."})
    humaneval_data_file: Optional[str] = field(
        default=None,
        metadata={"help": "HumanEval test set: a local .jsonl(.gz) or hub id (default: openai/openai_humaneval)."},
    )
    mbpp_data_file: Optional[str] = field(
        default=None,
        metadata={
            "help": "Sanitized MBPP: a local .json/.jsonl or hub id "
            "(default: google-research-datasets/mbpp, config sanitized, all four splits)."
        },
    )
    output_dir: Optional[str] = field(
        default=None,
        metadata={
            "help": "Folder for <task>_predictions.jsonl (default: <model dir>/eval; for a hub id "
            "./eval_<task>_predictions.jsonl)."
        },
    )
    max_new_tokens: int = field(default=MAX_NEW_TOKENS, metadata={"help": "Most new tokens per completion."})
    batch_size: int = field(
        default=16, metadata={"help": "Prompts per batch for the HF backend (vLLM batches itself)."}
    )
    limit: Optional[int] = field(
        default=None, metadata={"help": "Only the first N problems of each task (smoke tests)."}
    )
    seed: int = field(default=0, metadata={"help": "Random seed (decoding is greedy)."})


def output_file(task: str, model: str, output_dir: Optional[str]) -> str:
    """Where the generations of `task` go."""
    if output_dir is not None:
        return os.path.join(output_dir, f"{task}_predictions.jsonl")
    return predictions_path(default_output_path(task, model))


def main() -> None:
    """Parse the arguments, build one backend and generate for each task."""
    configure_logging()
    model_arguments, arguments, protocol = HfArgumentParser(
        (GeneratorArguments, CodeGenerationArguments, ProtocolArguments)
    ).parse_args_into_dataclasses()
    if model_arguments.model is None:
        raise SystemExit("Pass --model PATH (a merged model directory, an adapter directory or a hub id).")
    tasks = [task.strip() for task in arguments.tasks.split(",") if task.strip()]
    unknown = [task for task in tasks if task not in DATASETS]
    if unknown:
        raise SystemExit(f"Unknown task(s) {unknown}; use {', '.join(DATASETS)}.")
    data_files = {"humaneval": arguments.humaneval_data_file, "mbpp": arguments.mbpp_data_file}
    # Check every task set before loading the model, so a missing task fails in seconds.
    selected = {
        task: tasks_to_generate(
            task, data_files[task], limit=arguments.limit, allow_subset=protocol.allow_subset
        )
        for task in tasks
    }
    backend = backend_for(model_arguments)
    settings = code_generation_settings(
        arguments.max_new_tokens, arguments.batch_size, arguments.seed, protocol=protocol.protocol
    )
    for task in tasks:
        generate_code_file(
            task,
            backend,
            output_file(task, model_arguments.model, arguments.output_dir),
            settings=settings,
            protocol=protocol.protocol,
            tasks=selected[task],
        )


if __name__ == "__main__":
    main()
