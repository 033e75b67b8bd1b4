"""TLoRA: task-aware low-rank adaptation on top of Hugging Face PEFT.

    from tlora import TLoRAConfig, get_tlora_model
    model = get_tlora_model(base_model, TLoRAConfig(r=128, lora_alpha=128, target_modules=[...]), calibration_data)

The three steps are also callable on their own: `compute_statistics` -> `plan_from_statistics` ->
`compute_lora_A` + `apply_plan`.
"""

from .allocation import BudgetError, ModulePlan, TLoRAPlan, allocate_ranks, allocate_scales, derive_plan
from .calibration import TLoRAStatistics, compute_statistics
from .config import TLoRAConfig
from .errors import CalibrationError, DecompositionError, NonFiniteCalibrationError, StatisticsMismatchError
from .export import AdapterExportError, VLLMCompatibilityError, check_vllm_compatible, export_for_vllm
from .initialization import compute_lora_A, projector_distance, top_right_singular_vectors
from .model import PLAN_FILE_NAME, TLoRAModel
from .pipeline import apply_plan, get_tlora_model, load_tlora_model, plan_from_statistics
from .plan_report import format_plan_table, save_plan_heatmap, write_plan_reports
from .targets import find_target_modules

__version__ = "0.1.0"

__all__ = [
    "AdapterExportError",
    "BudgetError",
    "CalibrationError",
    "DecompositionError",
    "ModulePlan",
    "NonFiniteCalibrationError",
    "PLAN_FILE_NAME",
    "StatisticsMismatchError",
    "TLoRAConfig",
    "TLoRAModel",
    "TLoRAPlan",
    "TLoRAStatistics",
    "VLLMCompatibilityError",
    "allocate_ranks",
    "allocate_scales",
    "apply_plan",
    "check_vllm_compatible",
    "compute_lora_A",
    "compute_statistics",
    "derive_plan",
    "export_for_vllm",
    "find_target_modules",
    "format_plan_table",
    "get_tlora_model",
    "load_tlora_model",
    "plan_from_statistics",
    "projector_distance",
    "save_plan_heatmap",
    "top_right_singular_vectors",
    "write_plan_reports",
]
