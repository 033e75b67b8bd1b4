"""MT-Bench: two-turn answers in FastChat's answer format, single-answer grading by an LLM judge, the mean score.

Answers. Each of the 80 questions has two turns. The model was trained on single-turn Alpaca examples, so the
conversation is written in the same template: turn 1 is `format_prompt(question_1)`; turn 2 appends the model's
first answer, a blank line, and the template's own instruction block for the second question:

    Below is an instruction ... request.\\n\\n### Instruction:\\n{q1}\\n\\n### Response:{a1}
    \\n\\n### Instruction:\\n{q2}\\n\\n### Response:          (one string; split here for the page)

Decoding follows FastChat's `gen_model_answer.py`: the temperature of the question's category (writing and roleplay
0.7, stem and humanities 0.1, the rest greedy; 0.7 for an unknown category), at most 1024 new tokens, answers
stripped; `--temperature_mode greedy` makes every answer greedy. Generation stops at the Alpaca stop strings.

Judging follows FastChat's `gen_judgment.py --mode single`: turn 1 with the `single-v1` prompt, turn 2 with
`single-v1-multi-turn`; questions of the categories math, reasoning and coding use `single-math-v1` /
`single-math-v1-multi-turn` with the reference answers inserted. The judge sees a system message and the formatted
prompt, answers at temperature 0, and its rating is read from `[[rating]]` (else `[rating]`), -1 when missing.
The score is the mean of all valid ratings of both turns (as FastChat's `show_result.py`); ratings of -1 are
excluded and counted.

Judgments are stored beside the answers they judge (`X_answers.jsonl` -> `X_judgments.jsonl`), each with the SHA-256
`digest` of everything the judge sees (the judge model, the judge prompt, and the system and user messages, which
hold the questions, the answers and the reference answers). A stored judgment is reused only when its digest is
the digest of the judgment asked for, so a changed answer, reference, prompt or judge is judged again.

Questions, judge prompts and reference answers come from paths the user gives; the defaults are FastChat's
published files, downloaded once into `~/.cache/tlora/fastchat` (the `fschat` wheel does not ship them).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional

from ..data.prompts import format_prompt
from .common import (
    RUN_RECORD_NAME,
    DataFormatError,
    check_prediction_ids,
    default_output_path,
    read_jsonl,
    write_jsonl,
)
from .generation import GenerationSettings, generation_settings
from .judge import DEFAULT_JUDGE_MODEL, JudgeClient, parse_rating
from .protocols import PAPER
from .task import RunOptions, Scores, TaskData, evaluate_task

logger = logging.getLogger(__name__)

FASTCHAT_DATA_URL = "https://raw.githubusercontent.com/lm-sys/FastChat/main/fastchat/llm_judge/data"
DEFAULT_QUESTION_FILE = f"{FASTCHAT_DATA_URL}/mt_bench/question.jsonl"
DEFAULT_JUDGE_PROMPTS_FILE = f"{FASTCHAT_DATA_URL}/judge_prompts.jsonl"
DEFAULT_REFERENCE_ANSWER_FILE = f"{FASTCHAT_DATA_URL}/mt_bench/reference_answer/gpt-4.jsonl"
CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "tlora", "fastchat")

# FastChat (fastchat/llm_judge/common.py): categories judged against reference answers, and answer temperatures.
NEED_REF_CATEGORIES = ("math", "reasoning", "coding", "arena-hard-200")
CATEGORY_TEMPERATURES = {
    "writing": 0.7,
    "roleplay": 0.7,
    "extraction": 0.0,
    "math": 0.0,
    "coding": 0.0,
    "reasoning": 0.0,
    "stem": 0.1,
    "humanities": 0.1,
    "arena-hard-200": 0.0,
}
UNKNOWN_CATEGORY_TEMPERATURE = 0.7
TEMPERATURE_MODES = ("fastchat", "greedy")
MAX_NEW_TOKENS = 1024  # FastChat's --max-new-token default
FULL_SET_SIZE = 80  # MT-Bench's questions

# FastChat's single-answer judge prompts, by (reference needed, second turn).
SINGLE_JUDGE_PROMPTS = {
    (False, False): "single-v1",
    (False, True): "single-v1-multi-turn",
    (True, False): "single-math-v1",
    (True, True): "single-math-v1-multi-turn",
}
TURN_SEPARATOR = "\n\n"  # between an answer and the next instruction block


# ----------------------------------------------------------------------------------------------------------------
# Files


def resolve_data_file(path_or_url: str) -> str:
    """A local path for `path_or_url`; an http(s) URL is downloaded once into the cache folder."""
    if not path_or_url.startswith(("http://", "https://")):
        path = os.path.expanduser(path_or_url)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path_or_url} does not exist; pass an existing file (or leave the default).")
        return path
    import urllib.request

    target = os.path.join(CACHE_DIR, path_or_url.split("/data/", 1)[-1].replace("/", "__"))
    if not os.path.isfile(target):
        os.makedirs(CACHE_DIR, exist_ok=True)
        logger.info("Downloading %s to %s", path_or_url, target)
        try:
            with urllib.request.urlopen(path_or_url, timeout=60) as response:
                data = response.read()
        except OSError as error:
            raise OSError(
                f"Could not download {path_or_url} ({error}); download FastChat's MT-Bench files by hand and pass "
                "--question_file, --judge_prompts_file and --reference_answer_file."
            ) from error
        with open(target + ".part", "wb") as handle:
            handle.write(data)
        os.replace(target + ".part", target)
    return target


def load_questions(path: str, limit: Optional[int] = None) -> list[dict]:
    """MT-Bench questions (`question_id`, `category`, `turns`), checked."""
    rows = read_jsonl(resolve_data_file(path))
    for index, row in enumerate(rows):
        if not {"question_id", "category", "turns"} <= set(row) or not isinstance(row["turns"], list):
            raise DataFormatError(
                f"{path}, line {index + 1}: an MT-Bench question needs 'question_id', 'category' and a list 'turns'."
            )
    return rows[:limit] if limit is not None else rows


def load_judge_prompts(path: str) -> dict[str, dict]:
    """FastChat's judge prompts keyed by name; the four single-answer prompts must be present."""
    prompts = {row["name"]: row for row in read_jsonl(resolve_data_file(path)) if "name" in row}
    missing = [name for name in SINGLE_JUDGE_PROMPTS.values() if name not in prompts]
    if missing:
        raise DataFormatError(f"{path} lacks the judge prompt(s) {missing}; pass FastChat's judge_prompts.jsonl.")
    return prompts


def load_answers(
    path: str, question_ids: Optional[Collection[Any]] = None, question_file: str = "the question file"
) -> dict[Any, dict]:
    """Answers in FastChat's answer-file format keyed by question id, one per question, each one a question of
    `question_ids` (those of `question_file`) when given."""
    rows = read_jsonl(resolve_data_file(path))
    for index, row in enumerate(rows):
        choices = row.get("choices")
        if "question_id" not in row or not choices or not isinstance(choices[0].get("turns"), list):
            raise DataFormatError(
                f"{path}, line {index + 1}: expected FastChat's answer format "
                '{"question_id", "model_id", "choices": [{"index": 0, "turns": [...]}]}.'
            )
    known_ids = None if question_ids is None else set(question_ids)
    ids = [row["question_id"] for row in rows]
    check_prediction_ids(
        rows,
        ids,
        None if known_ids is None else known_ids.__contains__,
        data=question_file,
        describe=lambda key: f"question_id {key!r}",
    )
    return dict(zip(ids, rows))


# ----------------------------------------------------------------------------------------------------------------
# Answers


def question_temperature(category: str, mode: str = "fastchat") -> float:
    """The answer temperature for a question category (FastChat's table, or 0 in greedy mode)."""
    if mode not in TEMPERATURE_MODES:
        raise ValueError(f"Unknown temperature mode {mode!r}; use one of {', '.join(TEMPERATURE_MODES)}.")
    if mode == "greedy":
        return 0.0
    return CATEGORY_TEMPERATURES.get(category, UNKNOWN_CATEGORY_TEMPERATURE)


def _instruction_block(instruction: str) -> str:
    """The template's `### Instruction: ... ### Response:` block for one turn (the template minus its preamble)."""
    prompt = format_prompt(instruction)
    return prompt[prompt.index("### Instruction:") :]


def conversation_prompt(questions: Sequence[str], answers: Sequence[str]) -> str:
    """The Alpaca prompt for turn `len(answers) + 1`: earlier turns with their answers, then the next question."""
    if len(answers) >= len(questions):
        raise ValueError("conversation_prompt needs one more question than answers.")
    prompt = format_prompt(questions[0])
    for answer, question in zip(answers, questions[1:], strict=True):
        prompt += answer + TURN_SEPARATOR + _instruction_block(question)
    return prompt


def generate_answers(
    questions: Sequence[Mapping],
    backend,
    *,
    model_id: str,
    temperature_mode: str = "fastchat",
    max_new_tokens: int = MAX_NEW_TOKENS,
    batch_size: int = 16,
    seed: int = 0,
) -> list[dict]:
    """FastChat answer rows for `questions`: all first turns, then all second turns, batched per temperature."""
    answers: list[list[str]] = [[] for _ in questions]
    num_turns = max(len(question["turns"]) for question in questions) if questions else 0
    started = time.monotonic()
    for turn in range(num_turns):
        groups: dict[float, list[int]] = {}
        for index, question in enumerate(questions):
            if turn < len(question["turns"]):
                groups.setdefault(question_temperature(question["category"], temperature_mode), []).append(index)
        for temperature, indices in sorted(groups.items()):
            settings = generation_settings(max_new_tokens, temperature=temperature, batch_size=batch_size, seed=seed)
            prompts = [conversation_prompt(questions[i]["turns"][: turn + 1], answers[i]) for i in indices]
            for index, text in zip(indices, backend.generate(prompts, settings), strict=True):
                answers[index].append(text.strip())
        logger.info("Generated turn %d of %d questions", turn + 1, len(questions))
    logger.info("Generated MT-Bench answers in %.1f s", time.monotonic() - started)
    return [
        {
            "question_id": question["question_id"],
            "answer_id": uuid.uuid4().hex,
            "model_id": model_id,
            "choices": [{"index": 0, "turns": turns}],
            "tstamp": time.time(),
        }
        for question, turns in zip(questions, answers, strict=True)
    ]


# ----------------------------------------------------------------------------------------------------------------
# Judging


@dataclass
class SingleMatch:
    """One judgment to make: a question, a model's answer, the judge prompt and (for some categories) a reference."""

    question: dict
    answer: dict
    judge_prompt: dict
    reference: Optional[dict]
    multi_turn: bool

    @property
    def turn(self) -> int:
        """1 or 2."""
        return 2 if self.multi_turn else 1


def make_single_matches(
    questions: Sequence[Mapping],
    answers: Mapping[Any, Mapping],
    judge_prompts: Mapping[str, Mapping],
    references: Optional[Mapping[Any, Mapping]] = None,
) -> list[SingleMatch]:
    """Turn-1 and turn-2 matches for every question (turn 2 only for two-turn questions), as FastChat pairs them."""
    references = references or {}
    matches = []
    for question in questions:
        question_id = question["question_id"]
        if question_id not in answers:
            raise DataFormatError(
                f"The answer file has no answer to question {question_id}; generate all answers first."
            )
        needs_reference = question["category"] in NEED_REF_CATEGORIES
        if needs_reference and question_id not in references:
            raise DataFormatError(
                f"Question {question_id} ({question['category']}) needs a reference answer; pass FastChat's "
                "reference_answer/gpt-4.jsonl with --reference_answer_file."
            )
        reference = references.get(question_id) if needs_reference else None
        turns = [False, True] if len(question["turns"]) > 1 else [False]
        for multi_turn in turns:
            prompt = judge_prompts[SINGLE_JUDGE_PROMPTS[(needs_reference, multi_turn)]]
            matches.append(SingleMatch(dict(question), dict(answers[question_id]), dict(prompt), reference, multi_turn))
    return matches


def judge_messages(match: SingleMatch) -> tuple[list[dict], str]:
    """The chat messages sent to the judge (system + user) and the user prompt, exactly as FastChat formats them."""
    question, answer_turns = match.question, match.answer["choices"][0]["turns"]
    fields: dict[str, str] = {}
    if match.reference is not None:
        reference_turns = match.reference["choices"][0]["turns"]
        fields["ref_answer_1"] = reference_turns[0]
        if match.multi_turn:
            fields["ref_answer_2"] = reference_turns[1]
    if match.multi_turn:
        fields.update(
            question_1=question["turns"][0],
            question_2=question["turns"][1],
            answer_1=answer_turns[0],
            answer_2=answer_turns[1],
        )
    else:
        fields.update(question=question["turns"][0], answer=answer_turns[0])
    user_prompt = match.judge_prompt["prompt_template"].format(**fields)
    messages = [
        {"role": "system", "content": match.judge_prompt["system_prompt"]},
        {"role": "user", "content": user_prompt},
    ]
    return messages, user_prompt


def judgment_digest(match: SingleMatch, judge_model: str) -> str:
    """The SHA-256 of everything the judge sees for `match`: judge model, judge prompt, system and user messages."""
    messages, _ = judge_messages(match)
    content = {"judge_model": judge_model, "judge_prompt": match.judge_prompt, "messages": messages}
    return hashlib.sha256(json.dumps(content, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def judge_match(match: SingleMatch, client: JudgeClient) -> dict:
    """One judgment in FastChat's single-judgment format (question_id, model, judge, user_prompt, judgment, score,
    turn, tstamp), plus the `digest` of what the judge saw."""
    messages, user_prompt = judge_messages(match)
    judgment = client.complete(messages)
    return {
        "question_id": match.question["question_id"],
        "model": match.answer.get("model_id"),
        "judge": [client.settings.model, match.judge_prompt["name"]],
        "user_prompt": user_prompt,
        "judgment": judgment,
        "score": parse_rating(judgment),
        "turn": match.turn,
        "tstamp": time.time(),
        "digest": judgment_digest(match, client.settings.model),
    }


def stored_judgments(judgment_file: Optional[str]) -> dict[str, dict]:
    """Valid judgments of `judgment_file` keyed by digest (rows without a digest or a rating are not reused)."""
    if judgment_file is None or not os.path.isfile(judgment_file):
        return {}
    rows = read_jsonl(judgment_file)
    undigested = sum("digest" not in row for row in rows)
    if undigested:
        logger.info("%s: %d judgments without a digest (an older format) are not reused", judgment_file, undigested)
    return {row["digest"]: row for row in rows if "digest" in row and row.get("score", -1) != -1}


def judge_answers(
    matches: Sequence[SingleMatch],
    client: JudgeClient,
    *,
    judgment_file: Optional[str] = None,
    parallel: int = 4,
    progress: bool = True,
) -> list[dict]:
    """Judge every match (`parallel` calls at a time), appending each judgment to `judgment_file` as it arrives.

    A valid judgment already in `judgment_file` is reused when its digest matches (see the module docstring).
    """
    from tqdm.auto import tqdm

    done = stored_judgments(judgment_file)
    lock = threading.Lock()
    results: list[Optional[dict]] = [None] * len(matches)
    todo = []
    for index, match in enumerate(matches):
        digest = judgment_digest(match, client.settings.model)
        if digest in done:
            results[index] = done[digest]
        else:
            todo.append(index)
    if len(todo) < len(matches):
        logger.info("Reusing %d judgments from %s", len(matches) - len(todo), judgment_file)
    if judgment_file is not None:
        os.makedirs(os.path.dirname(os.path.abspath(judgment_file)), exist_ok=True)
    bar = tqdm(total=len(todo), desc="judging", disable=not progress)

    def run(index: int) -> None:
        row = judge_match(matches[index], client)
        with lock:
            results[index] = row
            if judgment_file is not None:
                with open(judgment_file, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            bar.update(1)

    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        for future in [pool.submit(run, index) for index in todo]:
            future.result()  # re-raise JudgeConfigurationError and the like
    bar.close()
    return [row for row in results if row is not None]


def summarize_judgments(judgments: Sequence[Mapping]) -> dict:
    """The MT-Bench score (mean of the valid ratings of both turns), the per-turn means, and the counts."""
    valid = [row for row in judgments if row["score"] != -1]

    def mean(rows: Sequence[Mapping]) -> Optional[float]:
        return sum(float(row["score"]) for row in rows) / len(rows) if rows else None

    return {
        "score": mean(valid),
        "turn_1": mean([row for row in valid if row["turn"] == 1]),
        "turn_2": mean([row for row in valid if row["turn"] == 2]),
        "num_judgments": len(valid),
        "num_failed": len(judgments) - len(valid),
    }


# ----------------------------------------------------------------------------------------------------------------
# End to end (what the entry scripts call)


def write_answers(path: str, answers: Sequence[Mapping]) -> None:
    """Write answer rows as FastChat's answer file, sorted by question id."""
    write_jsonl(path, sorted(answers, key=lambda row: row["question_id"]))
    logger.info("Wrote %d answers to %s", len(answers), path)


@dataclass
class MTBenchEvaluation:
    """The MT-Bench `EvaluationTask`: two-turn answers generated per FastChat's temperatures, judged by an LLM judge
    (FastChat's single-answer grading); the score is the mean rating over both turns."""

    question_file: str = DEFAULT_QUESTION_FILE
    judge_prompts_file: str = DEFAULT_JUDGE_PROMPTS_FILE
    reference_answer_file: str = DEFAULT_REFERENCE_ANSWER_FILE
    client: Optional[JudgeClient] = None  # needed to score
    judgment_file: Optional[str] = None
    parallel: int = 4
    limit: Optional[int] = None
    model_id: str = "model"  # recorded in generated answers
    temperature_mode: str = "fastchat"
    max_new_tokens: int = MAX_NEW_TOKENS
    batch_size: int = 16
    seed: int = 0
    name: str = "mt_bench"

    @property
    def protocol(self) -> str:
        """`paper` with the paper's judge (GPT-4), else `judge:<model>`: another judge gives a number of its own."""
        judge_model = self.client.settings.model if self.client is not None else DEFAULT_JUDGE_MODEL
        return PAPER if judge_model == DEFAULT_JUDGE_MODEL else f"judge:{judge_model}"

    def load_data(self) -> TaskData:
        """The questions (the first `limit`), with every question id of the file for checking answer files."""
        all_questions = load_questions(self.question_file)
        questions = all_questions[: self.limit] if self.limit is not None else all_questions
        ids = [question["question_id"] for question in all_questions]
        subset = self.limit is not None
        return TaskData(questions, self.question_file, len(all_questions), subset, FULL_SET_SIZE, {"ids": ids})

    def generation_settings(self) -> GenerationSettings:
        """The token limit, stop strings, batch size and seed (the temperature is set per question category)."""
        return generation_settings(self.max_new_tokens, batch_size=self.batch_size, seed=self.seed)

    def generate(self, data: TaskData, backend, settings: GenerationSettings) -> list[dict]:
        """FastChat answer rows for the questions, sorted by question id."""
        answers = generate_answers(
            data.items,
            backend,
            model_id=self.model_id,
            temperature_mode=self.temperature_mode,
            max_new_tokens=settings.max_new_tokens,
            batch_size=settings.batch_size,
            seed=settings.seed,
        )
        return sorted(answers, key=lambda row: row["question_id"])

    def read_predictions(self, path: str, data: TaskData) -> list[dict]:
        """An answer file's rows, one per question of the question file."""
        return list(load_answers(path, data.extra["ids"], self.question_file).values())

    def score(self, data: TaskData, predictions: Sequence[Mapping]) -> Scores:
        """Judge both turns of every answer (reusing stored judgments) and average the ratings."""
        if self.client is None:
            raise ValueError("Scoring MT-Bench needs a judge: pass client=JudgeClient(...).")
        questions = data.items
        answers = {row["question_id"]: row for row in predictions}
        needs_references = any(question["category"] in NEED_REF_CATEGORIES for question in questions)
        references = load_answers(self.reference_answer_file) if needs_references else {}
        matches = make_single_matches(questions, answers, load_judge_prompts(self.judge_prompts_file), references)
        judgments = judge_answers(matches, self.client, judgment_file=self.judgment_file, parallel=self.parallel)
        categories = {question["question_id"]: question["category"] for question in questions}
        records = [
            {**row, "category": categories[row["question_id"]]}
            for row in sorted(judgments, key=lambda row: (row["question_id"], row["turn"]))
        ]
        summary = summarize_judgments(records)
        if summary["num_failed"]:
            logger.warning(
                "%d of %d judgments have no rating (-1) and are left out of the score",
                summary["num_failed"],
                len(records),
            )
        model_ids = sorted({str(row["model"]) for row in records})
        summary.update(
            judge_model=self.client.settings.model,
            judge_base_url=self.client.settings.base_url,
            model_id=model_ids[0] if len(model_ids) == 1 else model_ids,
            num_questions=len(questions),
            judgment_file=self.judgment_file,
            question_file=self.question_file,
            judge_prompts_file=self.judge_prompts_file,
            reference_answer_file=self.reference_answer_file if needs_references else None,
        )
        return Scores(summary, records, len(questions))


def run_judgment(
    *,
    answer_file: str,
    question_file: str = DEFAULT_QUESTION_FILE,
    judge_prompts_file: str = DEFAULT_JUDGE_PROMPTS_FILE,
    reference_answer_file: str = DEFAULT_REFERENCE_ANSWER_FILE,
    client: JudgeClient,
    judgment_file: Optional[str] = None,
    output: Optional[str] = None,
    parallel: int = 4,
    limit: Optional[int] = None,
) -> dict:
    """Judge an answer file and write the judgments (FastChat format) and the result JSON; returns the result."""
    task = MTBenchEvaluation(
        question_file, judge_prompts_file, reference_answer_file, client, judgment_file, parallel, limit
    )
    options = RunOptions(predictions=answer_file, output=output, limit=limit, extra={"answer_file": answer_file})
    return evaluate_task(task, options)


ANSWERS_SUFFIX = "_answers.jsonl"
JUDGMENTS_SUFFIX = "_judgments.jsonl"


def default_files(model: Optional[str]) -> dict[str, str]:
    """Default paths: `<model dir>/eval/mt_bench{.json,_answers.jsonl,_judgments.jsonl}` for a local model, else the
    same names as `./eval_mt_bench*` in the current folder."""
    output = default_output_path("mt_bench", model)
    stem = output[: -len(".json")]
    return {"output": output, "answers": stem + ANSWERS_SUFFIX, "judgments": stem + JUDGMENTS_SUFFIX}


def files_beside_answers(answer_file: str) -> dict[str, str]:
    """The judgments file and result JSON that belong to an answer file: `X_answers.jsonl` -> `X_judgments.jsonl`
    and `X.json` (other names get `_judgments.jsonl` / `_mt_bench.json` after their stem)."""
    path = os.path.abspath(os.path.expanduser(answer_file))
    if path.endswith(ANSWERS_SUFFIX):
        stem = path[: -len(ANSWERS_SUFFIX)]
        return {"judgments": stem + JUDGMENTS_SUFFIX, "output": stem + ".json"}
    stem = os.path.splitext(path)[0]
    return {"judgments": stem + JUDGMENTS_SUFFIX, "output": stem + "_mt_bench.json"}


def default_model_id(model: str) -> str:
    """A model id for the answer file: the model folder's name, with its run folder's name when the folder is a
    copy inside a run (`RUN/merged` -> `RUN/merged`), or the hub id's last part."""
    path = os.path.normpath(os.path.expanduser(model))
    name = os.path.basename(path) or "model"
    parent = os.path.dirname(path)
    if os.path.isdir(path) and os.path.isfile(os.path.join(parent, RUN_RECORD_NAME)):
        return f"{os.path.basename(parent)}/{name}"
    return name


__all__ = [
    "CATEGORY_TEMPERATURES",
    "MTBenchEvaluation",
    "DEFAULT_JUDGE_PROMPTS_FILE",
    "DEFAULT_QUESTION_FILE",
    "DEFAULT_REFERENCE_ANSWER_FILE",
    "NEED_REF_CATEGORIES",
    "SINGLE_JUDGE_PROMPTS",
    "SingleMatch",
    "conversation_prompt",
    "default_files",
    "default_model_id",
    "files_beside_answers",
    "judgment_digest",
    "stored_judgments",
    "generate_answers",
    "judge_answers",
    "judge_match",
    "judge_messages",
    "load_answers",
    "load_judge_prompts",
    "load_questions",
    "make_single_matches",
    "question_temperature",
    "resolve_data_file",
    "run_judgment",
    "summarize_judgments",
    "write_answers",
]
