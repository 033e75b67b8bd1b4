"""Generate MT-Bench answers (two turns, FastChat's answer-file format) with vLLM or Hugging Face `generate`.

    python chat/gen_mt_bench_answers.py --model output/chat-tlora
    python chat/gen_mt_bench_answers.py --model output/chat-tlora --question_file ../shared/data/mt_bench/question.jsonl

Writes `<model dir>/eval/mt_bench_answers.jsonl` (or `./eval_mt_bench_answers.jsonl` for a hub id); judge it with
`python chat/judge_mt_bench.py --predictions FILE`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from transformers import HfArgumentParser

from tlora.evaluation.common import GeneratorArguments, backend_for, configure_logging
from tlora.evaluation.mt_bench import (
    DEFAULT_QUESTION_FILE,
    MAX_NEW_TOKENS,
    TEMPERATURE_MODES,
    MTBenchEvaluation,
    default_files,
    default_model_id,
)
from tlora.evaluation.task import generate_predictions


@dataclass
class AnswerArguments:
    """Which questions to answer, how to decode, and where to write the answers."""

    question_file: str = field(
        default=DEFAULT_QUESTION_FILE, metadata={"help": "MT-Bench questions (default: FastChat's question.jsonl)."}
    )
    answer_file: Optional[str] = field(
        default=None, metadata={"help": "Output answer file (default: <model dir>/eval/mt_bench_answers.jsonl)."}
    )
    model_id: Optional[str] = field(
        default=None, metadata={"help": "Name recorded in the answers (default: folder name)."}
    )
    temperature_mode: str = field(
        default="fastchat",
        metadata={
            "help": "'fastchat': FastChat's temperature per category; 'greedy': greedy for every question.",
            "choices": list(TEMPERATURE_MODES),
        },
    )
    max_new_tokens: int = field(default=MAX_NEW_TOKENS, metadata={"help": "Most new tokens per answer."})
    batch_size: int = field(default=16, metadata={"help": "Prompts per batch for the HF backend."})
    limit: Optional[int] = field(default=None, metadata={"help": "Only the first N questions (smoke tests)."})
    seed: int = field(default=0, metadata={"help": "Sampling seed."})


def main() -> None:
    """Parse the arguments, build the backend, answer both turns and write the answer file."""
    configure_logging()
    model_arguments, arguments = HfArgumentParser((GeneratorArguments, AnswerArguments)).parse_args_into_dataclasses()
    if model_arguments.model is None:
        raise SystemExit("Pass --model PATH (a merged model directory, an adapter directory or a hub id).")
    task = MTBenchEvaluation(
        question_file=arguments.question_file,
        limit=arguments.limit,
        model_id=arguments.model_id or default_model_id(model_arguments.model),
        temperature_mode=arguments.temperature_mode,
        max_new_tokens=arguments.max_new_tokens,
        batch_size=arguments.batch_size,
        seed=arguments.seed,
    )
    data = task.load_data()  # read and check the questions before loading the model
    backend = backend_for(model_arguments)
    generate_predictions(task, data, backend, arguments.answer_file or default_files(model_arguments.model)["answers"])


if __name__ == "__main__":
    main()
