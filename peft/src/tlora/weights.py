"""Reading a target module's weight as a plain float matrix: float layers as they are, bitsandbytes 4-bit and 8-bit
layers dequantised one module at a time, and clear errors for weights TLoRA cannot read (other quantisations,
weights offloaded to `meta`, parameters partitioned by DeepSpeed ZeRO-3)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .errors import CalibrationError

FLOAT = "float"
BNB_4BIT = "bnb-4bit"
BNB_8BIT = "bnb-8bit"

_BNB_PARAMETER_KINDS = {"Params4bit": BNB_4BIT, "Int8Params": BNB_8BIT}


def weight_storage(name: str, module: nn.Module) -> str:
    """How module `name` stores its weight: "float", "bnb-4bit" or "bnb-8bit"; `CalibrationError` otherwise."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise CalibrationError(
            f"target module {name} ({type(module).__name__}) has no weight tensor; exclude it from target_modules"
        )
    kind = _BNB_PARAMETER_KINDS.get(type(weight).__name__)
    if kind is not None:
        return kind
    if not weight.dtype.is_floating_point:
        raise CalibrationError(
            f"target module {name} ({type(module).__name__}) stores its weight as {weight.dtype}, not as a float "
            "matrix; TLoRA reads float weights and bitsandbytes 4-bit/8-bit layers only. Load the base model "
            "unquantised or with bitsandbytes (--load_in_4bit / --load_in_8bit), or exclude the module"
        )
    return FLOAT


def check_weight_readable(name: str, module: nn.Module) -> None:
    """Raise `CalibrationError` for a weight on `meta` (offloaded) or partitioned by DeepSpeed ZeRO-3."""
    weight = module.weight
    if hasattr(weight, "ds_shape") or hasattr(weight, "ds_id") or (weight.numel() == 0 and _has_features(module)):
        shape = tuple(getattr(weight, "ds_shape", weight.shape))
        raise CalibrationError(
            f"the weight of target module {name} is partitioned by DeepSpeed ZeRO-3 (local shape "
            f"{tuple(weight.shape)}, full shape {shape}); TLoRA reads every target weight to calibrate and to "
            "initialise A, which ZeRO-3 partitioning does not allow. Run TLoRA with ZeRO-2 (e.g. "
            "config/ds_config_zero2_no_offload.json) or without DeepSpeed"
        )
    if weight.device.type == "meta":
        raise CalibrationError(
            f"the weight of target module {name} is on the 'meta' device (offloaded by accelerate's device_map or "
            "not loaded); TLoRA reads every target weight during calibration. Load the model without disk/CPU "
            "offloading (e.g. device_map='auto' with enough max_memory, or a smaller dtype / 4-bit)"
        )


def _has_features(module: nn.Module) -> bool:
    """True when the module declares its shape (in_features/out_features or nf/nx for Conv1D)."""
    return hasattr(module, "in_features") or hasattr(module, "nf")


def dequantized_weight(module: nn.Module, storage: str) -> torch.Tensor:
    """The module's weight in its stored orientation as a float tensor (a new tensor for quantised layers)."""
    if storage == FLOAT:
        return module.weight.detach()
    _restore_standard_layout(module)
    from peft.utils.integrations import dequantize_bnb_weight

    # PEFT's helper: bitsandbytes' dequantize_4bit with the weight's quant_state, or the 8-bit rows times SCB / 127.
    return dequantize_bnb_weight(module.weight, state=getattr(module, "state", None)).detach()


def _restore_standard_layout(module: nn.Module) -> None:
    """Undo bitsandbytes' CPU inference repacking of a 4-bit weight (done on an eval-mode, no-grad forward on CPUs
    with AVX512-BF16), as bitsandbytes itself does before saving: that layout has no backward pass."""
    state = getattr(module.weight, "quant_state", None)
    if state is not None and getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

        module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(module.weight.data, state)


@contextmanager
def differentiable_quantized_layers(modules: Iterable[tuple[nn.Module, str]]) -> Iterator[None]:
    """Within the block, bitsandbytes 4-bit layers (given with their storage kind) run their differentiable kernel:
    standard weight layout and train mode (a Linear4bit has no dropout; only its CPU kernel choice reads the mode)."""
    quantized = [module for module, storage in modules if storage == BNB_4BIT]
    modes = [module.training for module in quantized]
    try:
        for module in quantized:
            _restore_standard_layout(module)
            module.train()
        yield
    finally:
        for module, mode in zip(quantized, modes):
            module.train(mode)
