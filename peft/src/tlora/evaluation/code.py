"""Code generation and pass@1 (HumanEval, MBPP): the code `EvaluationTask` and the functions the scripts call.

The data (task sets, EvalPlus files, predictions files) is in `code_data.py`, the prompts and the paper's clean-up
of a completion in `code_cleanup.py`, the sandboxed scoring in `code_scoring.py`; this module ties them into
`CodeEvaluation` (load the tasks, generate or read predictions, score, write the one result schema).

Protocols (`protocols.py`): `robust` cleans completions with this project's rules (`code_cleanup`) and stops at the
Alpaca stop strings. `paper` follows the authors' `evaluate/code/gen_vllm.py` and `code_process.py`: no stop
strings, at most 1,024 new tokens, their clean-up (`paper_postprocess_completion`), and EvalPlus's scoring of
`prompt + completion` on the base and plus tests (so it needs EvalPlus's data file). The authors' prompts come from a
`python` test file of PiSSA's dataset that is not public in this form; the paper protocol uses this project's
prompts (a difference listed in the README).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from .code_cleanup import build_prompt, code_protocol, postprocess_for
from .code_data import (
    DEFAULT_DATA_FILES,
    FULL_SET_SIZES,
    CodeTask,
    check_dataset,
    evalplus_data_file,
    load_code_tasks,
    read_code_predictions,
    reference_predictions,
    select_tasks,
    tasks_to_generate,
)
from .code_scoring import build_records, code_metrics, plan_scoring, run_tests, select_predictions
from .common import write_jsonl
from .generation import GenerationBackend, GenerationSettings, generation_settings
from .protocols import ROBUST
from .sandbox import SandboxLimits, default_workers, resolve_isolation
from .task import RunOptions, Scores, TaskData, evaluate_task, result_schema

logger = logging.getLogger(__name__)

# The paper's generation limit for code (the published vLLM script uses max_tokens=1024).
MAX_NEW_TOKENS = 1024


def code_generation_settings(
    max_new_tokens: Optional[int] = None, batch_size: int = 16, seed: int = 0, protocol: str = ROBUST
) -> GenerationSettings:
    """Greedy decoding with the paper's code limit; the Alpaca stop strings (robust) or none (the authors')."""
    stop = code_protocol(protocol).stop
    return generation_settings(max_new_tokens or MAX_NEW_TOKENS, stop, batch_size=batch_size, seed=seed)


def generate_code_predictions(
    dataset: str,
    tasks: Sequence[CodeTask],
    backend: GenerationBackend,
    settings: GenerationSettings,
    protocol: str = ROBUST,
) -> list[dict]:
    """One predictions row per task: task_id, model prompt, raw completion and post-processed completion."""
    postprocess = postprocess_for(protocol)
    prompts = [build_prompt(dataset, task) for task in tasks]
    started = time.monotonic()
    texts = backend.generate(prompts, settings)
    logger.info("Generated %d %s completions in %.1f s", len(texts), dataset, time.monotonic() - started)
    return [
        {"task_id": task.task_id, "prompt": prompt, "raw_completion": text, "completion": postprocess(text)}
        for task, prompt, text in zip(tasks, prompts, texts, strict=True)
    ]


@dataclass
class CodeEvaluation:
    """The code `EvaluationTask`: HumanEval or MBPP under a protocol, scored in the sandbox."""

    dataset: str
    data_file: Optional[str] = None
    evalplus_file: Optional[str] = None
    settings: Optional[GenerationSettings] = None
    limit: Optional[int] = None
    postprocess: bool = True
    protocol: str = ROBUST
    allow_subset: bool = False
    limits: Optional[SandboxLimits] = None
    workers: Optional[int] = None
    progress: bool = True
    unsafe_execution: bool = False
    tasks: Optional[Sequence[CodeTask]] = field(default=None, repr=False)  # already loaded tasks (else from data)

    def __post_init__(self) -> None:
        check_dataset(self.dataset)
        code_protocol(self.protocol)  # an unknown protocol fails here
        self.source = self.data_file or DEFAULT_DATA_FILES[self.dataset]

    @property
    def name(self) -> str:
        """The dataset's name (the result's `task`)."""
        return self.dataset

    def load_data(self) -> TaskData:
        """The test problems (the first `limit` when given)."""
        tasks = list(self.tasks) if self.tasks is not None else load_code_tasks(self.dataset, self.source, self.limit)
        subset = self.allow_subset or self.limit is not None
        return TaskData(tasks, self.source, len(tasks), subset, FULL_SET_SIZES[self.dataset])

    def generation_settings(self) -> GenerationSettings:
        """The given settings, else greedy with the protocol's stop strings and the paper's token limit."""
        return self.settings or code_generation_settings(protocol=self.protocol)

    def generate(self, data: TaskData, backend: GenerationBackend, settings: GenerationSettings) -> list[dict]:
        """Completions for EvalPlus's task set (all of it unless a subset is allowed)."""
        evalplus_file = evalplus_data_file(self.dataset, self.evalplus_file)
        selected, _ = select_tasks(
            self.dataset, data.items, evalplus_file, source=self.source, allow_subset=data.subset
        )
        return generate_code_predictions(self.dataset, selected, backend, settings, self.protocol)

    def read_predictions(self, path: str, data: TaskData) -> list[dict]:
        """A predictions file's rows, one per task of the data."""
        described = self.source if self.limit is None else f"the first {self.limit} tasks of {self.source} (--limit)"
        return read_code_predictions(path, self.dataset, [task.task_id for task in data.items], data=described)

    def score(self, data: TaskData, predictions: Sequence[Mapping]) -> Scores:
        """pass@1 over EvalPlus's task set, the tests run isolated (see `code_scoring`)."""
        isolation = resolve_isolation(self.limits or SandboxLimits(), self.unsafe_execution)
        plan = plan_scoring(
            self.dataset,
            data.items,
            data_file=self.source,
            evalplus_file=self.evalplus_file,
            protocol=self.protocol,
            allow_subset=data.subset,
            isolation=isolation,
        )
        rows = select_predictions(plan, predictions)
        records = build_records(plan, rows, self.postprocess)
        workers = self.workers or default_workers()
        seconds = run_tests(
            plan,
            records,
            limits=self.limits,
            workers=workers,
            progress=self.progress,
            unsafe_execution=self.unsafe_execution,
        )
        metrics = code_metrics(plan, records, len(rows), seconds, postprocess=self.postprocess)
        return Scores(metrics, records, len(plan.scored_ids))


def score_code_predictions(
    dataset: str,
    predictions: Sequence[Mapping],
    tasks: Optional[Sequence[CodeTask]] = None,
    **options: Any,
) -> dict:
    """pass@1 of `predictions` (rows with task_id and completion) over EvalPlus's task set: the result dict with one
    record per prediction (`options`: the fields of `CodeEvaluation`).

    A task of the set without a prediction is an error unless `allow_subset` (then only predicted tasks are scored,
    and the result says so); predictions for tasks outside the test data are an error. Generated code runs isolated
    (`sandbox.py`); where the isolation is not available this raises `SandboxUnavailableError` before any work,
    unless `unsafe_execution` (recorded in the result).
    """
    task = CodeEvaluation(dataset, tasks=tasks, **options)
    data = task.load_data()
    scores = task.score(data, predictions)
    return result_schema(task, data, scores, RunOptions(), backend=None, settings=None)


def generate_code_file(
    dataset: str,
    backend: GenerationBackend,
    output_path: str,
    *,
    data_file: Optional[str] = None,
    settings: Optional[GenerationSettings] = None,
    limit: Optional[int] = None,
    evalplus_file: Optional[str] = None,
    allow_subset: bool = False,
    protocol: str = ROBUST,
    tasks: Optional[Sequence[CodeTask]] = None,
) -> list[dict]:
    """Generate completions for EvalPlus's task set of `dataset` (or for `tasks`, from `tasks_to_generate`) and write
    them as a predictions file (JSON lines)."""
    if tasks is None:
        tasks = tasks_to_generate(
            dataset, data_file, limit=limit, evalplus_file=evalplus_file, allow_subset=allow_subset
        )
    settings = settings or code_generation_settings(protocol=protocol)
    rows = generate_code_predictions(dataset, tasks, backend, settings, protocol)
    write_jsonl(output_path, rows)
    logger.info("Wrote %d %s generations to %s", len(rows), dataset, output_path)
    return rows


def evaluate_code(
    dataset: str,
    *,
    predictions_file: Optional[str] = None,
    backend: Optional[GenerationBackend] = None,
    output: Optional[str] = None,
    score_references: bool = False,
    extra: Optional[Mapping] = None,
    **options: Any,
) -> dict:
    """Score `predictions_file` (or generate with `backend` first, or the references) and write the result JSON
    (`options`: the fields of `CodeEvaluation`)."""
    task = CodeEvaluation(dataset, **options)
    run = RunOptions(predictions=predictions_file, output=output, limit=task.limit, extra=dict(extra or {}))
    if score_references:
        task.postprocess, task.tasks = False, task.load_data().items
        run.rows = reference_predictions(dataset, task.tasks)
        run.extra = {"predictions": "reference solutions", **run.extra}
    elif predictions_file is None and backend is None:
        raise ValueError("Pass --predictions FILE to score existing generations, or --model PATH to generate them.")
    return evaluate_task(task, run, backend=backend)


__all__ = [
    "MAX_NEW_TOKENS",
    "CodeEvaluation",
    "code_generation_settings",
    "evaluate_code",
    "generate_code_file",
    "generate_code_predictions",
    "score_code_predictions",
]
