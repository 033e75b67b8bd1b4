"""Judge MT-Bench answers with an OpenAI-compatible LLM judge (FastChat's single-answer grading) and report the score.

    OPENAI_API_KEY=... python chat/judge_mt_bench.py --predictions output/chat-tlora/eval/mt_bench_answers.jsonl
    python chat/judge_mt_bench.py --model output/chat-tlora --judge_base_url http://127.0.0.1:8000/v1 \
        --judge_model my-judge --judge_api_key_env MY_JUDGE_KEY

No model is loaded. Writes the judgments in FastChat's single-judgment format beside the answers they judge
(`X_answers.jsonl` -> `X_judgments.jsonl`) and the result JSON (`score` is the mean rating over both turns). A
stored judgment is reused only if the judge would see exactly the same thing (question, answers, reference, judge
prompt and judge model, by digest), so a changed answer is judged again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from transformers import HfArgumentParser

from tlora.evaluation.common import configure_logging
from tlora.evaluation.judge import DEFAULT_API_KEY_ENV, DEFAULT_JUDGE_MODEL, JudgeClient, JudgeSettings
from tlora.evaluation.mt_bench import (
    DEFAULT_JUDGE_PROMPTS_FILE,
    DEFAULT_QUESTION_FILE,
    DEFAULT_REFERENCE_ANSWER_FILE,
    default_files,
    files_beside_answers,
    run_judgment,
)


@dataclass
class JudgmentArguments:
    """Which answers to judge, with which judge and data, and where to write the judgments and the result."""

    predictions: Optional[str] = field(
        default=None, metadata={"help": "The answer file to judge (default: <model dir>/eval/mt_bench_answers.jsonl)."}
    )
    model: Optional[str] = field(
        default=None, metadata={"help": "The evaluated model's folder: locates the default answer and output files."}
    )
    question_file: str = field(default=DEFAULT_QUESTION_FILE, metadata={"help": "MT-Bench questions."})
    judge_prompts_file: str = field(default=DEFAULT_JUDGE_PROMPTS_FILE, metadata={"help": "FastChat's judge prompts."})
    reference_answer_file: str = field(
        default=DEFAULT_REFERENCE_ANSWER_FILE,
        metadata={"help": "Reference answers for math, reasoning and coding (FastChat's gpt-4.jsonl)."},
    )
    judge_model: str = field(default=DEFAULT_JUDGE_MODEL, metadata={"help": "The judge model name."})
    judge_base_url: Optional[str] = field(
        default=None, metadata={"help": "OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 (default: OpenAI)."}
    )
    judge_api_key_env: str = field(
        default=DEFAULT_API_KEY_ENV, metadata={"help": "Environment variable that holds the judge's API key."}
    )
    judgment_file: Optional[str] = field(
        default=None,
        metadata={"help": "Judgments, appended (default: beside the answers, X_answers.jsonl -> X_judgments.jsonl)."},
    )
    output: Optional[str] = field(
        default=None,
        metadata={
            "help": "Result JSON (default: <model dir>/eval/mt_bench.json with --model, else beside the answers: "
            "X_answers.jsonl -> X.json)."
        },
    )
    parallel: int = field(default=4, metadata={"help": "Judge calls in flight at once."})
    max_retries: int = field(default=8, metadata={"help": "Retries of a failing judge call (exponential backoff)."})
    limit: Optional[int] = field(default=None, metadata={"help": "Only the first N questions (smoke tests)."})


def main() -> None:
    """Parse the arguments, judge both turns of every answer and write the results."""
    configure_logging()
    (arguments,) = HfArgumentParser(JudgmentArguments).parse_args_into_dataclasses()
    defaults = default_files(arguments.model)
    answer_file = arguments.predictions or defaults["answers"]
    if not os.path.isfile(answer_file):
        raise SystemExit(
            f"No answer file at {answer_file}; run chat/gen_mt_bench_answers.py first or pass --predictions FILE."
        )
    beside = files_beside_answers(answer_file)
    output = arguments.output or (defaults["output"] if arguments.model else beside["output"])
    judgment_file = arguments.judgment_file or beside["judgments"]
    client = JudgeClient(
        JudgeSettings(
            model=arguments.judge_model,
            base_url=arguments.judge_base_url,
            api_key_env=arguments.judge_api_key_env,
            max_retries=arguments.max_retries,
        )
    )
    result = run_judgment(
        answer_file=answer_file,
        question_file=arguments.question_file,
        judge_prompts_file=arguments.judge_prompts_file,
        reference_answer_file=arguments.reference_answer_file,
        client=client,
        judgment_file=judgment_file,
        output=output,
        parallel=arguments.parallel,
        limit=arguments.limit,
    )
    score = "n/a" if result["score"] is None else f"{result['score']:.3f}"
    print(
        f"MT-Bench score {score} (turn 1 {result['turn_1']}, turn 2 {result['turn_2']}; {result['num_judgments']} "
        f"judgments, {result['num_failed']} without rating) -> {os.path.abspath(output)}"
    )


if __name__ == "__main__":
    main()
