"""The TLoRA pipeline: statistics -> plan -> adapter. `get_tlora_model` runs all three steps in one call
(`compute_statistics`, `plan_from_statistics`, `compute_lora_A` + `apply_plan`); `load_tlora_model` loads a saved
adapter folder back as a `TLoRAModel`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Optional

import torch
from peft import PeftModel, get_peft_model

from . import distributed
from .allocation import ModuleInfo, TLoRAPlan, check_parameter_budget, derive_plan
from .calibration import (
    PassShare,
    TLoRAStatistics,
    cached_statistics,
    check_same_base_weights,
    compute_statistics,
    place_statistics,
    resolve_statistics_device,
)
from .config import TLoRAConfig
from .errors import CalibrationError
from .initialization import compute_lora_A, digest_lora_A
from .model import TLoRAModel, checked_adapter_plan
from .outputs import AdapterFolderError
from .targets import TargetModule, check_readable_weights, find_target_modules

logger = logging.getLogger(__name__)


def plan_from_statistics(statistics: TLoRAStatistics, config: TLoRAConfig) -> TLoRAPlan:
    """Step 2: the plan (ranks and scales) that `config`'s budget gives for these statistics."""
    modules = [
        ModuleInfo(record.name, record.out_features, record.in_features, statistics.sensitivity(record.name))
        for record in statistics.modules
    ]
    return derive_plan(
        modules,
        r=config.r,
        lora_alpha=config.lora_alpha,
        rank_budget=config.rank_budget,
        parameter_budget=config.parameter_budget,
        min_rank=config.min_rank,
        max_rank=config.max_rank,
        allocate_scales_=config.allocate_scales,
        use_rslora=config.use_rslora,
        freeze_lora_A=config.freeze_lora_A,
        sensitivity_mode=statistics.sensitivity_mode,
        num_samples=statistics.num_sensitivity_samples,
    )


def lora_A_from_statistics(
    targets: list[TargetModule], statistics: TLoRAStatistics, plan: TLoRAPlan, config: TLoRAConfig,
    show_progress: bool = True,
) -> dict[str, torch.Tensor]:
    """A of every adapted module of `plan`, with `config`'s SVD settings (see `compute_lora_A`)."""
    return compute_lora_A(
        targets,
        statistics,
        plan,
        method=config.svd_method,
        oversampling=config.svd_oversampling,
        niter=config.svd_niter,
        show_progress=show_progress,
    )


def apply_plan(
    model: torch.nn.Module,
    plan: TLoRAPlan,
    lora_A: Mapping[str, torch.Tensor] | TLoRAStatistics,
    config: TLoRAConfig,
    *,
    adapter_name: str = "default",
    autocast_adapter_dtype: bool = True,
    show_progress: bool = True,
) -> PeftModel:
    """Step 3: wrap `model` in a PEFT LoRA model built from `plan`, with A given directly ({module name: A}) or
    computed from `TLoRAStatistics` (top right singular vectors of W C), and B = 0."""
    if isinstance(lora_A, TLoRAStatistics):
        lora_A = lora_A_from_statistics(find_target_modules(model, config), lora_A, plan, config, show_progress)
    lora_config = config.to_lora_config(plan, module_names=[name for name, _ in model.named_modules()])
    peft_model = get_peft_model(
        model, lora_config, adapter_name=adapter_name, autocast_adapter_dtype=autocast_adapter_dtype
    )
    tuner = TLoRAModel.adopt(peft_model.base_model)
    tuner.initialize_tlora_adapter(adapter_name, plan, lora_A)
    return peft_model


def agreed_plan(statistics: TLoRAStatistics, config: TLoRAConfig) -> TLoRAPlan:
    """The plan of `statistics`: every rank derives it from all-reduced sums; rank 0's copy is authoritative and the
    others must agree."""
    plan = plan_from_statistics(statistics, config)
    return TLoRAPlan.from_dict(distributed.broadcast_json(plan.to_dict(), src=0))


def lora_A_in_passes(
    model: torch.nn.Module, calibration_data: Iterable[Mapping[str, torch.Tensor]], config: TLoRAConfig,
    targets: list[TargetModule], show_progress: bool = True,
) -> tuple[TLoRAPlan, dict[str, torch.Tensor]]:
    """The plan and A with `config.statistics_passes` > 1 passes over `calibration_data`, each holding one group of
    the statistics (layout.statistic_groups), decomposed and freed before the next pass starts.

    The first pass runs forward and backward: every module's sensitivity (so the whole plan) and the statistics of
    the last group of layers. The others are forward-only, for the earlier groups, cut after their last layer. The
    sums are the same as one pass's, so plan and A are too; only the peak memory of the statistics shrinks."""
    count = config.statistics_passes
    if iter(calibration_data) is calibration_data:
        raise CalibrationError(
            f"statistics_passes={count} reads calibration_data {count} times: give a list or a DataLoader, not an "
            "iterator or generator"
        )
    plan: Optional[TLoRAPlan] = None
    lora_A: dict[str, torch.Tensor] = {}
    for index in [count - 1, *range(count - 1)]:
        share = PassShare(index, count, sensitivity=plan is None)
        statistics = compute_statistics(
            model, calibration_data, config, targets=targets, show_progress=show_progress, share=share
        )
        plan = plan if plan is not None else agreed_plan(statistics, config)
        collected = statistics.collected_modules()
        group = dataclasses.replace(plan, modules=[entry for entry in plan.modules if entry.name in collected])
        lora_A.update(lora_A_from_statistics(targets, statistics, group, config, show_progress))
        del statistics  # freed before the next pass allocates its own
    return plan, lora_A


def get_tlora_model(
    model: torch.nn.Module,
    config: TLoRAConfig,
    calibration_data: Optional[Iterable[Mapping[str, torch.Tensor]]] = None,
    *,
    statistics: Optional[TLoRAStatistics] = None,
    statistics_cache: Optional[str | Path] = None,
    calibration_seed: Optional[int] = None,
    calibration_cutoff_len: Optional[int] = None,
    adapter_name: str = "default",
    autocast_adapter_dtype: bool = True,
    show_progress: bool = True,
) -> PeftModel:
    """Calibrate, allocate and initialise in one call; returns a `peft.PeftModel` whose tuner is a `TLoRAModel`.

    Statistics come from `statistics` if given, else from `statistics_cache` if that safetensors file exists on rank
    0 (it is written after a fresh calibration pass, with a digest of the rows and `calibration_seed` /
    `calibration_cutoff_len`, and reused only for the same ones), else from a calibration pass over
    `calibration_data`. The plan is available as `model.base_model.tlora_plan(adapter_name)`.
    """
    if not isinstance(config, TLoRAConfig):
        raise TypeError(f"config must be a TLoRAConfig, got {type(config).__name__}")
    targets = find_target_modules(model, config)
    check_readable_weights(targets)
    shapes = [(t.name, t.out_features, t.in_features) for t in targets]
    check_parameter_budget(config.parameter_budget, shapes, config.freeze_lora_A)  # before the calibration pass
    if statistics_cache is not None and config.statistics_passes > 1:
        raise ValueError(
            f"statistics_passes={config.statistics_passes} cannot be combined with statistics_cache: the cache holds "
            "every statistic at once, which is the memory the passes avoid. Drop one of the two."
        )
    if statistics is not None or statistics_cache is not None:
        check_same_base_weights(targets)  # a calibration pass checks them itself
    if statistics is not None:
        distributed.run_agreed(lambda: statistics.check_matches(targets))
    elif statistics_cache is not None:
        statistics = cached_statistics(
            model, calibration_data, config, targets, statistics_cache, seed=calibration_seed,
            cutoff_len=calibration_cutoff_len, show_progress=show_progress,
        )
        # A loaded cache is on the CPU: each statistic goes to its module's device (or config.statistics_device).
        statistics = place_statistics(statistics, targets, resolve_statistics_device(config))
    elif calibration_data is None:
        raise CalibrationError("get_tlora_model needs calibration_data (or statistics / a statistics_cache file)")
    elif config.statistics_passes == 1:
        statistics = compute_statistics(model, calibration_data, config, targets=targets, show_progress=show_progress)
    if statistics is not None:
        plan = agreed_plan(statistics, config)
        lora_A = lora_A_from_statistics(targets, statistics, plan, config, show_progress)
    else:
        plan, lora_A = lora_A_in_passes(model, calibration_data, config, targets, show_progress)
    distributed.check_identical_across_ranks(plan.to_json().encode() + digest_lora_A(lora_A), "the TLoRA plan and A")
    return apply_plan(
        model, plan, lora_A, config, adapter_name=adapter_name, autocast_adapter_dtype=autocast_adapter_dtype
    )


def load_tlora_model(
    model: torch.nn.Module,
    adapter_path: str | Path,
    *,
    adapter_name: str = "default",
    is_trainable: bool = False,
    freeze_lora_A: Optional[bool] = None,
    check_base_weights: bool = True,
    **kwargs,
) -> PeftModel:
    """Load a saved TLoRA (= LoRA) adapter folder with PEFT and, when training continues, keep A frozen.

    The folder must hold its plan (`tlora_plan.json`); a folder whose files disagree with the manifest of the last
    complete save (`tlora_adapter.json`), whose configuration gives a module another rank than the plan, or whose
    recorded base-weight fingerprint differs from `model`'s target weights is refused. A is frozen when
    `freeze_lora_A` is True, or when it is None and the plan says so.
    """
    folder = Path(adapter_path)
    if not folder.is_dir():
        raise AdapterFolderError(f"{adapter_path} is not a folder; load_tlora_model reads a saved adapter folder")
    plan = checked_adapter_plan(model, folder, check_base_weights)
    peft_model = PeftModel.from_pretrained(model, str(folder), adapter_name=adapter_name, is_trainable=is_trainable, **kwargs)
    tuner = TLoRAModel.adopt(peft_model.base_model)
    tuner.tlora_plans[adapter_name] = plan
    if plan.freeze_lora_A if freeze_lora_A is None else freeze_lora_A:
        tuner.freeze_lora_A(adapter_name)
    return peft_model


__all__ = ["apply_plan", "get_tlora_model", "load_tlora_model", "lora_A_from_statistics", "plan_from_statistics"]
