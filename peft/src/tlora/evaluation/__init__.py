"""Evaluation: model loading, generation backends, answer scorers (GSM8K, MATH, commonsense) and shared IO.

Modules: `models` (resolve and load `--model PATH`), `generation` (vLLM / HF / callable backends), `common`
(JSON lines, arguments, output files), `gsm8k`, `math_answers`, `commonsense` (prompts, answer extraction, scoring).
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
