"""Exports of saved adapters for other runtimes: `python -m tlora.export ADAPTER OUT [--max_lora_rank N]` (vLLM)."""

from .vllm import (
    LLAMA_LORA_MODULES,
    VLLM_MAX_LORA_RANKS,
    AdapterExportError,
    VLLMCompatibilityError,
    check_plain_lora,
    check_vllm_compatible,
    export_for_vllm,
    main,
    vllm_max_lora_rank,
)

__all__ = [
    "AdapterExportError",
    "LLAMA_LORA_MODULES",
    "VLLMCompatibilityError",
    "VLLM_MAX_LORA_RANKS",
    "check_plain_lora",
    "check_vllm_compatible",
    "export_for_vllm",
    "main",
    "vllm_max_lora_rank",
]
