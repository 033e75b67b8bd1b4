"""Score HumanEval / MBPP completions with pass@1 over EvalPlus's task sets (164 / 378 tasks).

`--protocol paper` (default) is the authors' recipe: their clean-up of the completion, EvalPlus's base and plus
tests (needs EvalPlus's data file: HUMANEVAL_OVERRIDE_PATH / MBPP_OVERRIDE_PATH, --evalplus_file, or EvalPlus's own
cache). `--protocol robust` uses this project's clean-up, and the original tests when no EvalPlus file is at hand.
A task missing from the data or the predictions is an error unless --allow_subset (recorded in the result).

    python code/eval_code.py --dataset humaneval --predictions output/code-tlora/eval/humaneval_predictions.jsonl
    python code/eval_code.py --dataset mbpp --model output/code-tlora          # generate, then score
    HUMANEVAL_OVERRIDE_PATH=HumanEvalPlus.jsonl python code/eval_code.py --dataset humaneval --predictions ...
    python code/eval_code.py --dataset mbpp --data_file ../shared/data/mbpp/sanitized-mbpp.json --score_references

Generated code runs isolated (bubblewrap: its own namespaces, uid 65534, no network, read-only system, private
/tmp) with time, memory and process limits; its tests run outside it. Without bubblewrap or user namespaces the
scorer refuses to start unless --unsafe_execution.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Optional

from transformers import HfArgumentParser

from tlora.evaluation.code import MAX_NEW_TOKENS, code_generation_settings, evaluate_code
from tlora.evaluation.common import (
    GeneratorArguments,
    ProtocolArguments,
    backend_for,
    configure_logging,
    default_output_path,
)
from tlora.evaluation.sandbox import SandboxLimits


@dataclass
class CodeEvaluationArguments:
    """What to score, against which tests, with which limits, and where to write the result."""

    dataset: str = field(metadata={"help": "humaneval or mbpp.", "choices": ["humaneval", "mbpp"]})
    data_file: Optional[str] = field(
        default=None,
        metadata={
            "help": "The test set: a local file or hub id (default: openai/openai_humaneval; "
            "google-research-datasets/mbpp, sanitized, all four splits)."
        },
    )
    predictions: Optional[str] = field(
        default=None,
        metadata={
            "help": 'Score this generations file (JSON lines {"task_id", "completion"}; HumanEval: the code '
            "after the prompt, MBPP: the whole program) without loading any model."
        },
    )
    output: Optional[str] = field(
        default=None,
        metadata={
            "help": "Result JSON (default: <model dir>/eval/<dataset>.json for a local model, else "
            "./eval_<dataset>.json)."
        },
    )
    evalplus_file: Optional[str] = field(
        default=None,
        metadata={
            "help": "HumanEvalPlus.jsonl / MbppPlus.jsonl (default: $HUMANEVAL_OVERRIDE_PATH / "
            "$MBPP_OVERRIDE_PATH; without it the original tests are used)."
        },
    )
    postprocess: bool = field(
        default=True, metadata={"help": "Apply the paper's clean-up (code fence, __main__, example usage)."}
    )
    score_references: bool = field(
        default=False, metadata={"help": "Score the reference solutions instead (checks the harness: expect 1.0)."}
    )
    timeout_per_test: float = field(default=15.0, metadata={"help": "CPU seconds per test (original tests)."})
    memory_mb: int = field(default=4096, metadata={"help": "Address-space limit per program, MiB (original tests)."})
    workers: Optional[int] = field(default=None, metadata={"help": "Programs tested in parallel (default: CPU count)."})
    unsafe_execution: bool = field(
        default=False,
        metadata={
            "help": "Run generated code WITHOUT isolation when bubblewrap or user namespaces are missing (otherwise "
            "scoring refuses to start). Verdicts stay unforgeable, but the code can read and change this machine: "
            "only for code you trust. Recorded in the result (unsafe_execution)."
        },
    )
    max_new_tokens: int = field(default=MAX_NEW_TOKENS, metadata={"help": "Most new tokens per completion."})
    batch_size: int = field(default=16, metadata={"help": "Prompts per batch for the HF backend."})
    limit: Optional[int] = field(default=None, metadata={"help": "Only the first N problems (smoke tests)."})
    seed: int = field(default=0, metadata={"help": "Random seed (decoding is greedy)."})


def main() -> None:
    """Parse the arguments, then generate (with --model) or read (--predictions) and score."""
    configure_logging()
    model_arguments, arguments, protocol = HfArgumentParser(
        (GeneratorArguments, CodeEvaluationArguments, ProtocolArguments)
    ).parse_args_into_dataclasses()
    backend = None
    if arguments.predictions is None and not arguments.score_references:
        if model_arguments.model is None:
            sys.exit("Pass --predictions FILE to score existing generations, or --model PATH to generate them.")
        backend = backend_for(model_arguments)
    output = arguments.output or default_output_path(arguments.dataset, model_arguments.model)
    result = evaluate_code(
        arguments.dataset,
        predictions_file=arguments.predictions,
        backend=backend,
        data_file=arguments.data_file,
        output=output,
        evalplus_file=arguments.evalplus_file,
        settings=code_generation_settings(
            arguments.max_new_tokens, arguments.batch_size, arguments.seed, protocol=protocol.protocol
        ),
        protocol=protocol.protocol,
        allow_subset=protocol.allow_subset,
        limit=arguments.limit,
        postprocess=arguments.postprocess,
        limits=SandboxLimits(timeout_per_test=arguments.timeout_per_test, memory_mb=arguments.memory_mb),
        workers=arguments.workers,
        score_references=arguments.score_references,
        extra={"model": model_arguments.model},
        unsafe_execution=arguments.unsafe_execution,
    )
    plus = "" if result["pass@1_plus"] is None else f", {arguments.dataset}+ pass@1 {result['pass@1_plus']:.4f}"
    subset = ", subset" if result["data"]["subset"] else ""
    print(
        f"{arguments.dataset} pass@1 {result['pass@1']:.4f}{plus} ({result['num_items']} tasks{subset}; protocol "
        f"{result['protocol']}, tests {result['tests']}) -> {os.path.abspath(output)}"
    )


if __name__ == "__main__":
    main()
