"""A TLoRA run's output folder as the record of its adapter: write the plan and the initial A, and rebuild the same
adapter from them when the run resumes.

The initial A is written to `tlora_init.safetensors` with its digest and a fingerprint of the base model's target
weights; a resumed run checks that the targets, the base weights and (across ranks) the plan and A are those of the
run that wrote them, and rebuilds the adapter with `apply_plan` without calibrating again. Used by the training
core's TLoRA builder; imports only core modules.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from . import distributed
from .allocation import TLoRAPlan
from .config import TLoRAConfig
from .constants import PLAN_FILE, TLORA_INIT_FILE
from .initialization import digest_lora_A
from .model import modules_fingerprint
from .pipeline import apply_plan, get_tlora_model
from .outputs import atomic_save_safetensors
from .plan_report import write_plan_reports
from .targets import find_target_modules

logger = logging.getLogger(__name__)

INITIAL_A_FORMAT = "tlora-initial-A"


@dataclass
class TLoRAAdapter:
    """A TLoRA model with its plan, its initial (frozen) A and the fingerprint of the base weights it was built on."""

    model: torch.nn.Module
    plan: TLoRAPlan
    lora_A: dict[str, torch.Tensor]
    base_fingerprint: str
    calibrated: bool  # False when rebuilt from the output folder

    @property
    def lora_A_digest(self) -> str:
        """The hex digest of the initial A matrices (as written to, and checked against, the initial-A file)."""
        return digest_lora_A(self.lora_A).hex()


def base_weights_fingerprint(model: torch.nn.Module, config: TLoRAConfig) -> str:
    """A digest of the target weights of the base model (names and `tlora.targets.weight_fingerprint` of each)."""
    return modules_fingerprint(model, [target.name for target in find_target_modules(model, config)])


def check_resumed_targets(
    model: torch.nn.Module, config: TLoRAConfig, plan: TLoRAPlan, plan_path: Path, given: list[str]
) -> None:
    """Raise when --target_modules selects other modules than the plan of the run being resumed."""
    selected = [target.name for target in find_target_modules(model, config)]
    planned = [module.name for module in plan.modules]
    if set(selected) == set(planned):
        return
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in planned})
    only_plan, only_given = sorted(set(planned) - set(selected)), sorted(set(selected) - set(planned))
    raise ValueError(
        f"--target_modules {','.join(given)} differs from the targets of the checkpoint's run: its plan ({plan_path}) "
        f"adapts {len(planned)} modules of types {','.join(suffixes)}, these targets select {len(selected)} "
        f"(only in the plan: {only_plan[:2]}, only here: {only_given[:2]}). Resume with the original run's targets, "
        f"e.g. --target_modules {','.join(suffixes)}"
    )


def write_initial_A(lora_A: dict[str, torch.Tensor], path: Path, base_fingerprint: str) -> None:
    """Write the initial A matrices with their digest and the base weights' fingerprint (atomically)."""
    metadata = {"format": INITIAL_A_FORMAT, "digest": digest_lora_A(lora_A).hex(), "base_fingerprint": base_fingerprint}
    atomic_save_safetensors(lora_A, path, metadata=metadata)


def read_initial_A(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The A matrices and the metadata of an initial-A file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, dict(handle.metadata() or {})


def initial_A(model: Any) -> dict[str, torch.Tensor]:
    """The A matrices of a freshly built TLoRA model, as float32 CPU tensors keyed by module name."""
    return {
        name: layer.lora_A["default"].weight.detach().to(device="cpu", dtype=torch.float32).contiguous()
        for name, layer in model.base_model.lora_layers("default").items()
    }


def rebuild_from_output_dir(
    model: torch.nn.Module, config: TLoRAConfig, output_dir: Path, given_targets: list[str]
) -> TLoRAAdapter:
    """The adapter of the run that wrote `output_dir` (its plan and initial A), after checking targets, base weights
    and that every rank read the same plan and A."""
    plan_path, init_path = output_dir / PLAN_FILE, output_dir / TLORA_INIT_FILE
    if not (plan_path.is_file() and init_path.is_file()):
        raise FileNotFoundError(
            f"resuming a tlora run needs {plan_path.name} and {init_path.name} in {output_dir} (written "
            "by the run that made the checkpoint); without them A cannot be rebuilt bit for bit"
        )
    plan = TLoRAPlan.load(plan_path)
    check_resumed_targets(model, config, plan, plan_path, given_targets)
    fingerprint = base_weights_fingerprint(model, config)
    lora_A, metadata = read_initial_A(init_path)
    if metadata.get("base_fingerprint") not in (None, fingerprint):
        raise ValueError(
            f"{init_path} was computed for other base weights than {model.name_or_path!r}; resume with "
            "the base model of the original run"
        )
    distributed.check_identical_across_ranks(plan.to_json().encode() + digest_lora_A(lora_A), "the TLoRA plan and A")
    adapted = apply_plan(model, plan, lora_A, config)
    logger.info("Rebuilt the TLoRA adapter from %s and %s (no calibration).", plan_path, init_path)
    return TLoRAAdapter(adapted, plan, lora_A, fingerprint, calibrated=False)


def calibrate_and_record(
    model: torch.nn.Module,
    config: TLoRAConfig,
    batches: Iterable[dict[str, torch.Tensor]],
    output_dir: Path,
    *,
    statistics_cache: Optional[str] = None,
    calibration_seed: Optional[int] = None,
    show_progress: bool = True,
    is_main_process: bool = True,
) -> TLoRAAdapter:
    """Calibrate and build the TLoRA model; the main process writes the plan reports and the initial-A file."""
    fingerprint = base_weights_fingerprint(model, config)
    adapted = get_tlora_model(
        model,
        config,
        batches,
        statistics_cache=statistics_cache,
        calibration_seed=calibration_seed,
        show_progress=show_progress,
    )
    plan = adapted.base_model.tlora_plan()
    lora_A = initial_A(adapted)
    if is_main_process:
        write_plan_reports(plan, output_dir)
        write_initial_A(lora_A, output_dir / TLORA_INIT_FILE, fingerprint)
    return TLoRAAdapter(adapted, plan, lora_A, fingerprint, calibrated=True)
