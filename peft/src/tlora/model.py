"""`TLoRAModel` and the one-call entry point `get_tlora_model`.

TLoRA is LoRA with a task-aware start: the plan is expressed as a standard `LoraConfig` (explicit target modules,
`rank_pattern`, `alpha_pattern`), PEFT builds its own LoRA layers from it, and TLoRA then writes A, zeroes B and
declares A frozen through PEFT's per-layer `frozen_peft_weight_names`, which `set_adapter`, `set_requires_grad`,
`enable_adapter_layers` and `_mark_only_adapters_as_trainable` all honour. Nothing of PEFT is copied or replaced, so
saving, loading, merging and DeepSpeed behave as for any LoRA adapter.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Optional

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer, LoraModel

from . import distributed
from .allocation import ModuleInfo, TLoRAPlan, check_parameter_budget, derive_plan
from .calibration import check_same_base_weights, compute_statistics, resolve_statistics_device
from .calibration_statistics import TLoRAStatistics
from .config import TLoRAConfig
from .constants import PLAN_FILE
from .devices import place_statistics
from .errors import CalibrationError, StatisticsMismatchError
from .initialization import compute_lora_A, digest_lora_A
from .statistics_cache import cached_statistics
from .targets import check_readable_weights, find_target_modules

logger = logging.getLogger(__name__)

PLAN_FILE_NAME = PLAN_FILE  # public name kept: `from tlora import PLAN_FILE_NAME`


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


def _register_frozen_lora_A(layer: LoraLayer, adapter_name: str) -> None:
    """Declare `lora_A` of `adapter_name` frozen on this layer (PEFT re-applies this after every grad toggle)."""
    frozen = dict(getattr(layer, "frozen_peft_weight_names", None) or {})
    names = tuple(frozen.get(adapter_name, ()))
    if "lora_A" not in names:
        names = names + ("lora_A",)
    frozen[adapter_name] = names
    layer.frozen_peft_weight_names = frozen
    layer.lora_A[adapter_name].weight.requires_grad_(False)


class TLoRAModel(LoraModel):
    """PEFT's LoRA tuner carrying TLoRA adapters: layers built by PEFT from a plan, A from the SVD of W C, B = 0.

    It adds no state to the layers beyond what `LoraModel` has, so a `PeftModel` whose tuner is a `TLoRAModel`
    saves an ordinary LoRA adapter (`peft_type` LORA) that stock PEFT loads.
    """

    @classmethod
    def adopt(cls, tuner: LoraModel) -> "TLoRAModel":
        """Turn the `LoraModel` inside a `PeftModel` into a `TLoRAModel` in place (same object, same layers)."""
        if isinstance(tuner, cls):
            return tuner
        if type(tuner) is not LoraModel:
            raise TypeError(f"expected a peft LoraModel, got {type(tuner).__name__}")
        tuner.__class__ = cls
        tuner.tlora_plans = {}
        return tuner

    def tlora_plan(self, adapter_name: str = "default") -> TLoRAPlan:
        """The TLoRA plan of an adapter."""
        return self.tlora_plans[adapter_name]

    def lora_layers(self, adapter_name: str) -> dict[str, LoraLayer]:
        """Module name (relative to the base model) -> LoRA layer holding `adapter_name`."""
        layers = {}
        for name, module in self.model.named_modules():
            if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
                layers[name] = module
        return layers

    @torch.no_grad()
    def initialize_tlora_adapter(
        self,
        adapter_name: str,
        plan: TLoRAPlan,
        lora_A: Mapping[str, torch.Tensor],
        freeze_lora_A: Optional[bool] = None,
    ) -> None:
        """Write A from `lora_A`, set B = 0 and (by default, as the plan says) freeze A."""
        freeze = plan.freeze_lora_A if freeze_lora_A is None else freeze_lora_A
        layers = self.lora_layers(adapter_name)
        expected = set(plan.target_modules())
        if set(layers) != expected:
            raise ValueError(
                f"adapter {adapter_name!r} has LoRA layers {sorted(set(layers) - expected)[:3]} not in the plan "
                f"and lacks {sorted(expected - set(layers))[:3]}"
            )
        for name, layer in layers.items():
            entry = plan.module(name)
            a_layer, b_layer = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
            source = lora_A[name]
            if tuple(a_layer.weight.shape) != tuple(source.shape) or source.shape[0] != entry.rank:
                raise ValueError(
                    f"A for {name} has shape {tuple(source.shape)}, the layer expects {tuple(a_layer.weight.shape)}"
                )
            a_layer.weight.copy_(source.to(device=a_layer.weight.device, dtype=a_layer.weight.dtype))
            b_layer.weight.zero_()
            if getattr(b_layer, "bias", None) is not None:
                b_layer.bias.zero_()
            if freeze:
                _register_frozen_lora_A(layer, adapter_name)
        self.tlora_plans[adapter_name] = plan

    def freeze_lora_A(self, adapter_name: str = "default") -> None:
        """Declare A of `adapter_name` frozen on every layer (used after loading a saved adapter)."""
        for layer in self.lora_layers(adapter_name).values():
            _register_frozen_lora_A(layer, adapter_name)


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
        lora_A = compute_lora_A(
            find_target_modules(model, config),
            lora_A,
            plan,
            method=config.svd_method,
            oversampling=config.svd_oversampling,
            niter=config.svd_niter,
            show_progress=show_progress,
        )
    lora_config = config.to_lora_config(plan, module_names=[name for name, _ in model.named_modules()])
    peft_model = get_peft_model(
        model, lora_config, adapter_name=adapter_name, autocast_adapter_dtype=autocast_adapter_dtype
    )
    tuner = TLoRAModel.adopt(peft_model.base_model)
    tuner.initialize_tlora_adapter(adapter_name, plan, lora_A)
    return peft_model


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
    else:
        if calibration_data is None:
            raise CalibrationError("get_tlora_model needs calibration_data (or statistics / a statistics_cache file)")
        statistics = compute_statistics(model, calibration_data, config, targets=targets, show_progress=show_progress)
    plan = plan_from_statistics(statistics, config)
    # Every rank derives the plan from all-reduced sums; rank 0's copy is authoritative and the others must agree.
    plan = TLoRAPlan.from_dict(distributed.broadcast_json(plan.to_dict(), src=0))
    lora_A = compute_lora_A(
        targets,
        statistics,
        plan,
        method=config.svd_method,
        oversampling=config.svd_oversampling,
        niter=config.svd_niter,
        show_progress=show_progress,
    )
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
    **kwargs,
) -> PeftModel:
    """Load a saved TLoRA (= LoRA) adapter with PEFT and, when training continues, keep A frozen.

    A is frozen when `freeze_lora_A` is True, or when it is None and the adapter folder holds a TLoRA plan
    (`tlora_plan.json`) that says so.
    """
    peft_model = PeftModel.from_pretrained(model, str(adapter_path), adapter_name=adapter_name, is_trainable=is_trainable, **kwargs)
    tuner = TLoRAModel.adopt(peft_model.base_model)
    plan_path = Path(adapter_path) / PLAN_FILE_NAME
    if plan_path.is_file():
        tuner.tlora_plans[adapter_name] = TLoRAPlan.load(plan_path)
    if freeze_lora_A is None:
        freeze_lora_A = tuner.tlora_plans[adapter_name].freeze_lora_A if adapter_name in tuner.tlora_plans else False
    if freeze_lora_A:
        tuner.freeze_lora_A(adapter_name)
    return peft_model


__all__ = [
    "TLoRAModel",
    "apply_plan",
    "get_tlora_model",
    "load_tlora_model",
    "plan_from_statistics",
    "StatisticsMismatchError",
    "LoraConfig",
]
