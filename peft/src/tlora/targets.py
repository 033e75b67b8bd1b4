"""The modules that receive an adapter: which they are, their shapes, how to read their weight, a fingerprint."""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass

import torch
from peft.tuners.lora import LoraModel
from peft.tuners.tuners_utils import BaseTuner, _maybe_include_all_linear_layers, check_target_module_exists
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import TLoRAConfig
from .errors import CalibrationError
from .weights import FLOAT, check_weight_readable, dequantized_weight, weight_storage

_SEQUENCE_CLASSIFICATION_HEADS = ("classifier", "score")


@dataclass
class TargetModule:
    """A linear map that receives an adapter: y = W x + b with W of shape (out_features, in_features)."""

    name: str
    module: nn.Module
    kind: str  # "linear" or "conv1d" (GPT-2's Conv1D stores W transposed)
    storage: str = FLOAT  # "float", or "bnb-4bit" / "bnb-8bit" for bitsandbytes layers (read dequantised)

    @property
    def out_features(self) -> int:
        """m, the number of outputs (from the module, not from a packed or partitioned weight)."""
        if self.kind == "linear":
            return int(getattr(self.module, "out_features", None) or self.module.weight.shape[0])
        return int(getattr(self.module, "nf", None) or self.module.weight.shape[1])

    @property
    def in_features(self) -> int:
        """n, the number of inputs (from the module, not from a packed or partitioned weight)."""
        if self.kind == "linear":
            return int(getattr(self.module, "in_features", None) or self.module.weight.shape[1])
        return int(getattr(self.module, "nx", None) or self.module.weight.shape[0])

    def statistic_shape(self, layout: str) -> tuple[int, int]:
        """Shape of the module's statistic: C (n x n) in the "covariance" layout, W C (m x n) in the "cross" one."""
        if layout == "covariance":
            return (self.in_features, self.in_features)
        return (self.out_features, self.in_features)

    def weight_matrix(self, dtype: torch.dtype, copy: bool = True) -> torch.Tensor:
        """W in (out, in) orientation in `dtype`: a new tensor, or with `copy=False` a view when no cast is needed."""
        weight = dequantized_weight(self.module, self.storage)
        weight = weight if self.kind == "linear" else weight.t()
        return weight.to(dtype=dtype, copy=copy and self.storage == FLOAT)

    def fingerprint(self) -> str:
        """The fingerprint of the weight as stored (dequantised for bitsandbytes layers)."""
        return weight_fingerprint(dequantized_weight(self.module, self.storage))


def _resolve_target_config(model: nn.Module, config: TLoRAConfig) -> TLoRAConfig:
    """A copy of `config` with PEFT's default targets filled in and sequence-classification heads excluded."""
    config = copy.deepcopy(config)
    if config.target_modules is None:
        model_type = BaseTuner.get_model_config(model).get("model_type")
        defaults = LoraModel.target_module_mapping.get(model_type)
        if defaults is None:
            raise CalibrationError(
                f"target_modules is not set and PEFT has no default for model type {model_type!r}; "
                "pass target_modules explicitly"
            )
        config.target_modules = defaults if isinstance(defaults, str) else set(defaults)
    config = _maybe_include_all_linear_layers(config, model)
    if str(config.task_type) in ("SEQ_CLS", "TaskType.SEQ_CLS"):
        # PeftModelForSequenceClassification trains the head through modules_to_save; it never gets an adapter.
        config.modules_to_save = list(config.modules_to_save or []) + [
            head for head in _SEQUENCE_CLASSIFICATION_HEADS if head not in (config.modules_to_save or [])
        ]
    return config


def find_target_modules(model: nn.Module, config: TLoRAConfig) -> list[TargetModule]:
    """The modules PEFT would adapt under `config`, in model order; only nn.Linear and Conv1D are supported."""
    if hasattr(model, "peft_config"):
        raise CalibrationError("pass the base model, not a PEFT model: TLoRA calibrates the frozen base weights")
    resolved = _resolve_target_config(model, config)
    targets, unsupported = [], []
    for name, module in model.named_modules():
        if not name or not check_target_module_exists(resolved, name):
            continue
        if isinstance(module, nn.Linear):
            targets.append(TargetModule(name, module, "linear", weight_storage(name, module)))
        elif isinstance(module, Conv1D):
            targets.append(TargetModule(name, module, "conv1d"))
        else:
            unsupported.append(f"{name} ({type(module).__name__})")
    if unsupported:
        raise CalibrationError(
            "TLoRA adapts nn.Linear and Conv1D modules (float, or bitsandbytes 4-bit/8-bit) only; these targets are "
            "of other types: " + ", ".join(unsupported[:8]) + ". Quantised layers such as GPTQ, AWQ or HQQ cannot "
            "be calibrated: load the base model unquantised or with bitsandbytes, or exclude these modules"
        )
    if not targets:
        linear = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))]
        raise CalibrationError(
            f"target_modules={config.target_modules!r} match no nn.Linear/Conv1D module of "
            f"{type(model).__name__}. Linear modules look like: {', '.join(linear[:6]) or 'none'}"
        )
    return targets


def check_readable_weights(targets: list[TargetModule]) -> None:
    """Raise `CalibrationError` before any work if a target's weight is offloaded to meta or ZeRO-3 partitioned."""
    for target in targets:
        check_weight_readable(target.name, target.module)


_FINGERPRINT_CHUNK = 1 << 15  # elements rounded at a time on the CPU: a small reused buffer, not a full-size copy


def weight_fingerprint(weight: torch.Tensor) -> str:
    """A short digest of every element of a weight, plus its shape; float values are rounded to bfloat16 first, so
    a float32 and a bfloat16 load of one checkpoint match (other dtypes count byte for byte)."""
    flat = weight.detach().reshape(-1)
    digest = hashlib.sha256(str(tuple(weight.shape)).encode())
    step = _FINGERPRINT_CHUNK if flat.device.type == "cpu" else max(1, flat.numel())
    scratch = torch.empty(min(step, flat.numel()), dtype=torch.bfloat16, device=flat.device)
    for start in range(0, flat.numel(), step):
        part = flat[start : start + step]
        if part.is_floating_point() and part.dtype != torch.bfloat16:
            part = scratch[: part.numel()].copy_(part)  # rounded to the nearest bfloat16
        digest.update(memoryview(part.contiguous().view(torch.uint8).cpu().numpy()))
    return digest.hexdigest()[:16]
