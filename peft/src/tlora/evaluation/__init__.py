"""Evaluation: one task interface, model loading, generation backends, sandboxed code scoring, the LLM judge, reports.

Every task is an `EvaluationTask` (`task.py`: data -> prompts -> generation -> scoring -> one result schema, run by
`evaluate_task`): GSM8K and MATH (`gsm8k`, `math_answers` on `answers.TaskSpec`), commonsense (`commonsense`), code
(`code`, with `code_data`, `code_cleanup`, `code_scoring` and the sandbox: `sandbox`, `sandbox_judge`,
`sandbox_solver`, `evalplus_judge`, `sandbox_probe`) and MT-Bench (`mt_bench`, `judge`). `common` holds the shared
IO and command-line arguments (`GeneratorArguments`, `backend_for`), `models` resolves and loads `--model PATH`,
`generation` the vLLM / HF / callable backends and the one `generation_settings` builder, `protocols` the paper and
robust protocols, `report` the results table. Nothing here imports `tlora.training`.
"""

from .generation import (
    DEFAULT_STOP_STRINGS,
    CallableBackend,
    GenerationBackend,
    GenerationSettings,
    HFBackend,
    VLLMBackend,
    make_backend,
    truncate_at_stop,
)
from .models import ResolvedModel, load_model_and_tokenizer, merged_model_dir, resolve_model

__all__ = [
    "DEFAULT_STOP_STRINGS",
    "CallableBackend",
    "GenerationBackend",
    "GenerationSettings",
    "HFBackend",
    "ResolvedModel",
    "VLLMBackend",
    "load_model_and_tokenizer",
    "make_backend",
    "merged_model_dir",
    "resolve_model",
    "truncate_at_stop",
]
