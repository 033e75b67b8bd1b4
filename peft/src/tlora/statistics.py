"""Step 1 of TLoRA: one calibration pass that collects, for every target module, the covariance of its inputs and
its sensitivity.

For each calibration sample s and target module l with weight W (m x n, out x in):

* covariance  C_l = sum_s Xc_s^T Xc_s, where Xc_s are the module's inputs at the sample's non-padding positions,
  centred by the sample's own mean. Modules that read the very same tensor (q/k/v; gate/up) share one C. A module
  that reads a tensor of its own and has m < n accumulates M_l = W C_l = sum_s (Xc_s W^T)^T Xc_s directly, which is
  smaller than C_l (Llama's down_proj).
* sensitivity S_l = (1/N) sum_s mean_ij |W_ij * (d loss_s / dW)_ij| with loss_s the sample's mean token loss.

Per-sample weight gradients are formed inside one batched pass: the backward pass computes activation gradients
only (no parameter requires grad), and each target module turns the gradient of its output, delta_s, and its saved
input X_s into dl_s/dW = delta_s^T X_s one sample at a time, consumes it and frees it. No `.grad` is ever written.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import itertools
import json
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import distributed
from .config import TLoRAConfig

logger = logging.getLogger(__name__)

STATISTICS_FORMAT = "tlora-statistics"
STATISTICS_VERSION = 1
_SEQUENCE_CLASSIFICATION_HEADS = ("classifier", "score")


class CalibrationError(ValueError):
    """Calibration data or model that TLoRA cannot calibrate on."""


class NonFiniteCalibrationError(FloatingPointError):
    """A NaN or Inf appeared during calibration; the message names the module and the sample."""


class StatisticsMismatchError(ValueError):
    """Saved statistics do not belong to this model or these target modules."""


# ---------------------------------------------------------------------------------------------------------------
# Target modules
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class TargetModule:
    """A linear map that receives an adapter: y = W x + b with W of shape (out_features, in_features)."""

    name: str
    module: nn.Module
    kind: str  # "linear" or "conv1d" (GPT-2's Conv1D stores W transposed)

    @property
    def out_features(self) -> int:
        return self.module.weight.shape[0] if self.kind == "linear" else self.module.weight.shape[1]

    @property
    def in_features(self) -> int:
        return self.module.weight.shape[1] if self.kind == "linear" else self.module.weight.shape[0]

    def weight_matrix(self, dtype: torch.dtype) -> torch.Tensor:
        """W in (out, in) orientation, as a new tensor of `dtype`."""
        weight = self.module.weight.detach()
        weight = weight if self.kind == "linear" else weight.t()
        return weight.to(dtype=dtype, copy=True)


def _resolve_target_config(model: nn.Module, config: TLoRAConfig) -> TLoRAConfig:
    from peft.tuners.lora import LoraModel
    from peft.tuners.tuners_utils import BaseTuner, _maybe_include_all_linear_layers

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
    from peft.tuners.tuners_utils import check_target_module_exists

    if hasattr(model, "peft_config"):
        raise CalibrationError("pass the base model, not a PEFT model: TLoRA calibrates the frozen base weights")
    resolved = _resolve_target_config(model, config)
    targets, unsupported = [], []
    for name, module in model.named_modules():
        if not name or not check_target_module_exists(resolved, name):
            continue
        if isinstance(module, nn.Linear):
            targets.append(TargetModule(name, module, "linear"))
        elif isinstance(module, Conv1D):
            targets.append(TargetModule(name, module, "conv1d"))
        else:
            unsupported.append(f"{name} ({type(module).__name__})")
    if unsupported:
        raise CalibrationError(
            "TLoRA adapts nn.Linear and Conv1D modules only; these targets are of other types: "
            + ", ".join(unsupported[:8])
        )
    if not targets:
        linear = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))]
        raise CalibrationError(
            f"target_modules={config.target_modules!r} match no nn.Linear/Conv1D module of "
            f"{type(model).__name__}. Linear modules look like: {', '.join(linear[:6]) or 'none'}"
        )
    return targets


def weight_fingerprint(weight: torch.Tensor) -> str:
    """A short, dtype-robust digest of a weight (4096 strided elements rounded to bfloat16, plus the shape)."""
    flat = weight.detach().reshape(-1)
    stride = max(1, flat.numel() // 4096)
    sample = flat[::stride][:4096].to(device="cpu", dtype=torch.bfloat16).view(torch.int16)
    digest = hashlib.sha256(str(tuple(weight.shape)).encode() + sample.numpy().tobytes())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------
# The statistics object
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class ModuleStatistics:
    """Per-module record of a calibration pass."""

    name: str
    kind: str
    out_features: int
    in_features: int
    layout: str  # "covariance": C stored under `covariance_key` (shared); "cross": M = W C stored under `name`
    covariance_key: str
    sensitivity_sum: float
    fingerprint: str


@dataclass
class TLoRAStatistics:
    """Covariances (or W C products) and sensitivities of all target modules, summed over the calibration set."""

    modules: list[ModuleStatistics]
    covariances: dict[str, torch.Tensor]
    cross_covariances: dict[str, torch.Tensor]
    num_samples: int
    num_tokens: int
    num_sensitivity_samples: int
    sensitivity_mode: str = "per_sample"
    dtype: str = "float32"
    extra: dict = field(default_factory=dict)

    def module(self, name: str) -> ModuleStatistics:
        for record in self.modules:
            if record.name == name:
                return record
        raise KeyError(name)

    @property
    def module_names(self) -> list[str]:
        return [record.name for record in self.modules]

    def sensitivity(self, name: str) -> float:
        """S_l = (1/N) sum_s g_{l,s}."""
        return self.module(name).sensitivity_sum / max(1, self.num_sensitivity_samples)

    def sensitivities(self) -> dict[str, float]:
        return {record.name: self.sensitivity(record.name) for record in self.modules}

    def covariance(self, name: str) -> Optional[torch.Tensor]:
        """C_l of a covariance-layout module (None for modules that stored W C directly)."""
        record = self.module(name)
        return self.covariances[record.covariance_key] if record.layout == "covariance" else None

    def weighted_covariance(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """M_l = W_l C_l (out x in) in the dtype of `weight` (given in out x in orientation)."""
        record = self.module(name)
        if record.layout == "cross":
            return self.cross_covariances[name].to(device=weight.device, dtype=weight.dtype)
        covariance = self.covariances[record.covariance_key].to(device=weight.device, dtype=weight.dtype)
        return weight @ covariance

    def to(self, device: torch.device | str) -> "TLoRAStatistics":
        """The same statistics with every tensor moved to `device`."""
        moved = copy.copy(self)
        moved.covariances = {k: v.to(device) for k, v in self.covariances.items()}
        moved.cross_covariances = {k: v.to(device) for k, v in self.cross_covariances.items()}
        return moved

    def nbytes(self) -> int:
        """Bytes held by the statistics tensors."""
        tensors = itertools.chain(self.covariances.values(), self.cross_covariances.values())
        return sum(t.numel() * t.element_size() for t in tensors)

    # ----- safetensors -----
    def _metadata(self) -> dict:
        return {
            "modules": [asdict(record) for record in self.modules],
            "num_samples": self.num_samples,
            "num_tokens": self.num_tokens,
            "num_sensitivity_samples": self.num_sensitivity_samples,
            "sensitivity_mode": self.sensitivity_mode,
            "dtype": self.dtype,
            "extra": self.extra,
        }

    def save(self, path: str | Path) -> Path:
        """Write the statistics to a safetensors file (tensors plus a JSON description in the metadata)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"covariance::{k}": v.detach().contiguous().cpu() for k, v in self.covariances.items()}
        tensors.update({f"cross::{k}": v.detach().contiguous().cpu() for k, v in self.cross_covariances.items()})
        metadata = {
            "format": STATISTICS_FORMAT,
            "version": str(STATISTICS_VERSION),
            "statistics": json.dumps(self._metadata()),
        }
        temporary = path.with_name(path.name + ".tmp")
        save_file(tensors, str(temporary), metadata=metadata)
        temporary.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "TLoRAStatistics":
        """Read statistics written by `save`."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no statistics file at {path}")
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != STATISTICS_FORMAT:
                raise StatisticsMismatchError(f"{path} is not a TLoRA statistics file")
            if int(metadata.get("version", "0")) > STATISTICS_VERSION:
                raise StatisticsMismatchError(f"{path} was written by a newer tlora (format {metadata['version']})")
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        description = json.loads(metadata["statistics"])
        covariances = {k.split("::", 1)[1]: v for k, v in tensors.items() if k.startswith("covariance::")}
        cross = {k.split("::", 1)[1]: v for k, v in tensors.items() if k.startswith("cross::")}
        return cls(
            modules=[ModuleStatistics(**record) for record in description["modules"]],
            covariances=covariances,
            cross_covariances=cross,
            num_samples=description["num_samples"],
            num_tokens=description["num_tokens"],
            num_sensitivity_samples=description["num_sensitivity_samples"],
            sensitivity_mode=description["sensitivity_mode"],
            dtype=description["dtype"],
            extra=description.get("extra", {}),
        )

    def check_matches(self, targets: list[TargetModule], check_weights: bool = True) -> None:
        """Raise `StatisticsMismatchError` unless these statistics were computed for exactly these modules."""
        expected = [t.name for t in targets]
        if expected != self.module_names:
            missing = sorted(set(expected) - set(self.module_names))
            extra = sorted(set(self.module_names) - set(expected))
            raise StatisticsMismatchError(
                "the statistics do not match the model's target modules: "
                f"missing for {missing[:5]}{'...' if len(missing) > 5 else ''} "
                f"and present for non-targets {extra[:5]}{'...' if len(extra) > 5 else ''}"
            )
        for target in targets:
            record = self.module(target.name)
            if (record.out_features, record.in_features) != (target.out_features, target.in_features):
                raise StatisticsMismatchError(
                    f"module {target.name} is {target.out_features}x{target.in_features} in the model but "
                    f"{record.out_features}x{record.in_features} in the statistics"
                )
            if check_weights and record.fingerprint != weight_fingerprint(target.module.weight):
                raise StatisticsMismatchError(
                    f"the weights of {target.name} differ from those the statistics were computed on "
                    "(another checkpoint?); recompute the statistics for this model"
                )


# ---------------------------------------------------------------------------------------------------------------
# Per-sample losses
# ---------------------------------------------------------------------------------------------------------------


def _close(value: torch.Tensor, reference: torch.Tensor) -> bool:
    return bool(torch.isclose(value.double(), reference.detach().double(), rtol=1e-3, atol=1e-5).item())


def per_sample_losses(
    outputs: Any, batch: Mapping[str, torch.Tensor], model: nn.Module, kind: Optional[str] = None
) -> Optional[tuple[torch.Tensor, torch.Tensor, str]]:
    """Each sample's mean loss, recomputed from the logits, as (losses, valid, kind), or None if the model's loss
    is not a recognised decomposition (checked against `outputs.loss`; when the model returned no loss, `kind` must
    be a decomposition verified before and is trusted).

    `valid` is False for samples without any label (their loss is undefined). `kind` names the decomposition
    found ("causal", "token", "single_label", "regression", "multi_label") so later batches skip the search.
    """
    logits = getattr(outputs, "logits", None)
    labels = batch.get("labels")
    reference = getattr(outputs, "loss", None)
    if logits is None or labels is None:
        return None
    if reference is None:
        # A decomposition already verified on an earlier batch: the model was run without labels.
        if kind is None:
            return None
        result = _decompose(kind, logits, labels)
        return None if result is None else (result[0], result[1], kind)
    candidates: list[str]
    if kind is not None:
        candidates = [kind]
    elif labels.dim() == 2 and logits.dim() == 3 and labels.shape == logits.shape[:2]:
        candidates = ["causal", "token"]
    elif labels.dim() >= 1 and logits.dim() == 2 and labels.shape[0] == logits.shape[0]:
        problem = getattr(getattr(model, "config", None), "problem_type", None)
        candidates = [problem.replace("_classification", "")] if problem else ["single_label", "regression"]
    else:
        return None
    for candidate in candidates:
        result = _decompose(candidate, logits, labels)
        if result is None:
            continue
        losses, valid, batch_mean = result
        if _close(batch_mean, reference):
            return losses, valid, candidate
    return None


def _decompose(kind: str, logits: torch.Tensor, labels: torch.Tensor):
    functional = nn.functional
    if kind in ("causal", "token"):
        if kind == "causal":
            # Shift the labels, not the logits: position t predicts token t + 1 (as transformers' ForCausalLMLoss).
            labels = nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
        batch, length, vocabulary = logits.shape
        token_losses = functional.cross_entropy(
            logits.reshape(batch * length, vocabulary).float(), labels.reshape(-1), ignore_index=-100, reduction="none"
        ).view(batch, length)
        counts = (labels != -100).sum(dim=1)
        sums = token_losses.sum(dim=1)
        valid = counts > 0
        losses = torch.where(valid, sums / counts.clamp_min(1), torch.zeros_like(sums))
        batch_mean = sums.sum() / counts.sum().clamp_min(1)
        return losses, valid, batch_mean
    if kind == "single_label":
        if labels.dim() != 1 or labels.dtype not in (torch.long, torch.int):
            return None
        losses = functional.cross_entropy(logits.float(), labels, reduction="none")
        return losses, torch.ones_like(losses, dtype=torch.bool), losses.mean()
    if kind == "regression":
        if logits.shape[-1] == 1:
            losses = (logits.float().squeeze(-1) - labels.float().view(-1)) ** 2
        else:
            losses = ((logits.float() - labels.float()) ** 2).mean(dim=-1)
        return losses, torch.ones_like(losses, dtype=torch.bool), losses.mean()
    if kind == "multi_label":
        losses = functional.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none")
        losses = losses.mean(dim=-1)
        return losses, torch.ones_like(losses, dtype=torch.bool), losses.mean()
    return None


# ---------------------------------------------------------------------------------------------------------------
# The calibration pass
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _BatchState:
    """What the hooks need to know about the batch being processed."""

    batch_index: int
    sample_offset: int
    mask: torch.Tensor  # (B, T) bool, on the model's input device
    counts: torch.Tensor  # (B,) valid positions per sample
    positions: list  # per sample: slice or index tensor of valid positions
    flat_valid: Optional[torch.Tensor]  # indices of valid rows in the flattened (B*T) view, when packing pays
    all_valid: bool = False  # no padding at all in this batch
    collect_covariance: bool = True
    collect_sensitivity: bool = True
    calls: dict = field(default_factory=dict)
    shared_inputs: dict = field(default_factory=dict)
    saved_inputs: dict = field(default_factory=dict)
    per_sample_sensitivity: dict = field(default_factory=dict)
    input_flags: list = field(default_factory=list)
    gradient_flags: list = field(default_factory=list)


def _sample_positions(mask: torch.Tensor) -> list:
    """Per sample, the valid positions as a slice when contiguous, else as an index tensor."""
    positions = []
    cpu_mask = mask.cpu()
    for row in cpu_mask:
        index = row.nonzero().flatten()
        if index.numel() == 0:
            positions.append(slice(0, 0))
        elif index[-1] - index[0] + 1 == index.numel():
            positions.append(slice(int(index[0]), int(index[-1]) + 1))
        else:
            positions.append(index.to(mask.device))
    return positions


class _Collector:
    """Forward and gradient hooks that accumulate the statistics of the target modules."""

    def __init__(
        self,
        targets: list[TargetModule],
        layout: dict[str, tuple[str, str]],
        *,
        dtype: torch.dtype,
        statistics_device: Optional[torch.device],
        sensitivity_mode: str,
    ):
        self.targets = {t.name: t for t in targets}
        self.layout = layout
        self.dtype = dtype
        self.statistics_device = statistics_device
        self.sensitivity_mode = sensitivity_mode
        self.covariances: dict[str, torch.Tensor] = {}
        self.cross: dict[str, torch.Tensor] = {}
        self.sensitivity_sums: dict[str, torch.Tensor] = {}
        self.state: Optional[_BatchState] = None
        self.handles: list = []

    # ----- hook management -----
    def attach(self) -> None:
        for name, target in self.targets.items():
            self.handles.append(target.module.register_forward_pre_hook(self._make_pre_hook()))
            self.handles.append(target.module.register_forward_hook(self._make_forward_hook(name)))

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _make_pre_hook(self):
        def pre_hook(module, args):
            state = self.state
            if state is None or not state.collect_sensitivity or not torch.is_grad_enabled():
                return None
            inputs = args[0]
            # Nothing upstream requires grad (all parameters are frozen), so this tensor is a leaf: marking it
            # makes the rest of the network differentiable without any weight gradient being computed.
            if not inputs.requires_grad:
                inputs.requires_grad_(True)
            return None

        return pre_hook

    def _make_forward_hook(self, name: str):
        def forward_hook(module, args, output):
            if self.state is not None:
                self._on_forward(name, args[0], output)
            return None

        return forward_hook

    # ----- accumulation -----
    def _buffer(self, store: dict, key: str, shape: tuple, device: torch.device) -> torch.Tensor:
        if key not in store:
            store[key] = torch.zeros(shape, dtype=self.dtype, device=self.statistics_device or device)
        return store[key]

    def _accumulate_product(self, buffer: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> None:
        """buffer += left^T @ right."""
        if buffer.device == left.device:
            buffer.addmm_(left.t(), right)
        else:
            buffer.add_((left.t() @ right).to(buffer.device))

    def _centred_rows(self, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`tensor` (batch, sequence, features) at valid positions, centred per sample, as rows in the statistics
        dtype (a new tensor); plus the per-sample sums used for the finiteness check."""
        state = self.state
        batch, length = state.mask.shape
        if tensor.dim() != 3 or tensor.shape[:2] != (batch, length):
            raise CalibrationError(
                f"a target module received inputs of shape {tuple(tensor.shape)}; TLoRA needs (batch, sequence, "
                f"features) matching attention_mask {tuple(state.mask.shape)}"
            )
        features = tensor.shape[-1]
        rows = tensor.detach().to(self.dtype, copy=True)
        if state.all_valid:
            sums = rows.sum(dim=1)
            rows.sub_((sums / length).unsqueeze(1))
        else:
            padding = ~state.mask.unsqueeze(-1)
            rows.masked_fill_(padding, 0.0)
            sums = rows.sum(dim=1)
            means = sums / state.counts.clamp_min(1).unsqueeze(-1).to(self.dtype)
            rows.sub_(means.unsqueeze(1)).masked_fill_(padding, 0.0)
        rows = rows.view(batch * length, features)
        if state.flat_valid is not None:
            rows = rows.index_select(0, state.flat_valid)
        return rows, sums

    def _on_forward(self, name: str, inputs: torch.Tensor, output: torch.Tensor) -> None:
        state = self.state
        state.calls[name] = state.calls.get(name, 0) + 1
        if state.calls[name] > 1:
            raise CalibrationError(
                f"target module {name} was called {state.calls[name]} times in one forward pass; TLoRA supports "
                "modules applied once per forward (no weight sharing across positions in the network)"
            )
        target = self.targets[name]
        layout, key = self.layout[name]
        if state.collect_covariance:
            if layout == "covariance" and key != name:
                if state.shared_inputs.get(key) is not inputs:
                    raise CalibrationError(
                        f"{name} was expected to read the same input tensor as {key} (found on the first batch) "
                        "but did not; the statistics cannot be shared"
                    )
            else:
                rows, sums = self._centred_rows(inputs)
                state.input_flags.append((name, torch.isfinite(sums.sum(dim=1))))
                if layout == "covariance":
                    state.shared_inputs[name] = inputs
                    buffer = self._buffer(self.covariances, key, (rows.shape[1],) * 2, rows.device)
                    self._accumulate_product(buffer, rows, rows)
                else:
                    # M = W C = sum_s Zc_s^T Xc_s, with Zc the per-sample centred outputs without bias.
                    if output.dtype == self.dtype:
                        outputs, _ = self._centred_rows(output)  # the bias cancels in the centring
                    else:
                        weight = target.module.weight.detach().to(self.dtype)
                        outputs = rows @ (weight.t() if target.kind == "linear" else weight)
                    shape = (target.out_features, target.in_features)
                    buffer = self._buffer(self.cross, name, shape, rows.device)
                    self._accumulate_product(buffer, outputs, rows)
                    del outputs
                del rows
        if state.collect_sensitivity and torch.is_grad_enabled() and output.requires_grad:
            state.saved_inputs[name] = inputs
            output.register_hook(self._make_gradient_hook(name))

    def _make_gradient_hook(self, name: str):
        def gradient_hook(grad_output):
            if self.state is not None:
                self._on_gradient(name, grad_output)
            return None

        return gradient_hook

    def _gradient_dtype(self, inputs: torch.Tensor) -> torch.dtype:
        """Per-sample weight gradients are formed in the statistics dtype, except for half-precision models on an
        accelerator, where they are formed in the model's dtype as autograd's own weight gradients would be (the
        L1 reduction still accumulates in float32)."""
        if inputs.device.type != "cpu" and inputs.dtype in (torch.bfloat16, torch.float16):
            return inputs.dtype
        return self.dtype

    def _on_gradient(self, name: str, grad_output: torch.Tensor) -> None:
        state = self.state
        inputs = state.saved_inputs.pop(name, None)
        if inputs is None:
            return
        target = self.targets[name]
        dtype = self._gradient_dtype(inputs)
        weight = target.module.weight.detach()
        weight = weight if weight.dtype == dtype else weight.to(dtype)
        numel = weight.numel()
        reduce_dtype = torch.promote_types(dtype, torch.float32)
        batch = grad_output.shape[0]
        values = torch.zeros(batch, dtype=torch.float64, device=grad_output.device)
        if self.sensitivity_mode == "per_sample":
            for sample, where in enumerate(state.positions):
                delta = grad_output[sample, where].to(dtype)
                if delta.shape[0] == 0:
                    continue
                inputs_s = inputs[sample, where].detach().to(dtype)
                # dl_s/dW for this sample only, in the weight's own layout, consumed at once.
                gradient = delta.t() @ inputs_s if target.kind == "linear" else inputs_s.t() @ delta
                values[sample] = torch.linalg.vector_norm(gradient.mul_(weight), ord=1, dtype=reduce_dtype) / numel
                del gradient
        else:
            flat_grad = grad_output.reshape(-1, grad_output.shape[-1])
            flat_inputs = inputs.detach().reshape(-1, inputs.shape[-1])
            valid = state.mask.reshape(-1)
            delta = flat_grad[valid].to(dtype)
            rows = flat_inputs[valid].to(dtype)
            gradient = delta.t() @ rows if target.kind == "linear" else rows.t() @ delta
            values[:] = torch.linalg.vector_norm(gradient.mul_(weight), ord=1, dtype=reduce_dtype) / numel
            del gradient
        # A NaN or Inf in the output gradient (or the saved input) propagates into these values.
        state.gradient_flags.append((name, torch.isfinite(values)))
        state.per_sample_sensitivity[name] = values


def _batch_size(batch: Mapping[str, Any]) -> int:
    return int(batch["input_ids"].shape[0])


def _model_input_device(model: nn.Module) -> torch.device:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        return embeddings.weight.device
    return next(model.parameters()).device


def _forward_keys(model: nn.Module) -> Optional[set]:
    """Names `model.forward` accepts, or None if it takes arbitrary keywords only."""
    parameters = inspect.signature(model.forward).parameters
    named = {n for n, p in parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return named or None


def _validate_batch(batch: Any, index: int) -> None:
    if not isinstance(batch, Mapping):
        raise CalibrationError(
            f"calibration batch {index} is a {type(batch).__name__}; TLoRA needs dicts of tensors with "
            "input_ids, attention_mask and labels (e.g. from a DataLoader with a padding collator)"
        )
    if "input_ids" not in batch or not torch.is_tensor(batch["input_ids"]):
        raise CalibrationError(f"calibration batch {index} has no input_ids tensor (keys: {sorted(batch)})")
    if "labels" not in batch or batch["labels"] is None:
        raise CalibrationError(
            f"calibration batch {index} has no 'labels' (keys: {sorted(batch)}); TLoRA's sensitivity needs a "
            "loss: give token labels (causal LM) or one label per sample (classification)"
        )
    if batch["input_ids"].dim() != 2:
        raise CalibrationError(
            f"calibration batch {index}: input_ids must be (batch, sequence), got {tuple(batch['input_ids'].shape)}"
        )


def _prepare_inputs(batch: Mapping[str, Any], device: torch.device, keys: Optional[set]) -> dict:
    prepared = {}
    for key, value in batch.items():
        if keys is not None and key not in keys:
            continue
        prepared[key] = value.to(device) if torch.is_tensor(value) else value
    if "attention_mask" not in prepared or prepared["attention_mask"] is None:
        prepared["attention_mask"] = torch.ones_like(prepared["input_ids"])
    if keys is None or "use_cache" in keys:
        prepared["use_cache"] = False
    return prepared


def _probe_layout(
    model: nn.Module, targets: list[TargetModule], inputs: dict
) -> dict[str, tuple[str, str]]:
    """Find which targets read the same tensor (one short no-grad forward) and choose each module's layout."""
    seen: dict[str, Any] = {}
    calls: dict[str, int] = {}
    handles = []

    def make_hook(name):
        def hook(module, args):
            seen.setdefault(name, args[0])
            calls[name] = calls.get(name, 0) + 1

        return hook

    for target in targets:
        handles.append(target.module.register_forward_pre_hook(make_hook(target.name)))
    probe = {}
    for key, value in inputs.items():
        if torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == inputs["input_ids"].shape[0]:
            value = value[:1]
            if value.dim() >= 2 and value.shape[1] == inputs["input_ids"].shape[1]:
                value = value[:, :16]
        probe[key] = value
    probe.pop("labels", None)
    try:
        with torch.no_grad():
            model(**probe)
    finally:
        for handle in handles:
            handle.remove()
    never = [t.name for t in targets if t.name not in seen]
    if never:
        raise CalibrationError(
            f"target modules never called in a forward pass: {never[:6]}; remove them from target_modules"
        )
    flat = [n for n, tensor in seen.items() if tensor.dim() != 3]
    if flat:
        raise CalibrationError(
            f"target modules {flat[:4]} see one vector per sample (input shape "
            f"{tuple(seen[flat[0]].shape)}), but TLoRA's covariance is taken over the positions of each sample; "
            f"exclude them, e.g. exclude_modules={[n.split('.', 1)[-1] if '.' in n else n for n in flat[:2]]}"
        )
    repeated = [n for n, c in calls.items() if c > 1]
    if repeated:
        raise CalibrationError(
            f"target modules called more than once per forward pass (shared weights): {repeated[:6]}; "
            "TLoRA supports modules applied once per forward"
        )
    layout: dict[str, tuple[str, str]] = {}
    leader_of_tensor: dict[int, str] = {}
    readers: dict[str, list[str]] = {}
    order = sorted(targets, key=lambda t: list(seen).index(t.name))
    for target in order:
        tensor_id = id(seen[target.name])
        leader = leader_of_tensor.setdefault(tensor_id, target.name)
        readers.setdefault(leader, []).append(target.name)
    for leader, names in readers.items():
        for name in names:
            target = next(t for t in targets if t.name == name)
            if len(names) == 1 and target.out_features < target.in_features:
                layout[name] = ("cross", name)
            else:
                layout[name] = ("covariance", leader)
    return layout


def _raise_non_finite(flags: list, state: _BatchState, what: str) -> None:
    for name, flag in flags:
        bad = (~flag).nonzero().flatten()
        if bad.numel():
            row = int(bad[0])
            raise NonFiniteCalibrationError(
                f"non-finite value (NaN or Inf) in the {what} of module '{name}' for calibration sample "
                f"{state.sample_offset + row} (batch {state.batch_index}, row {row})"
            )


def _check_flags(flags: list, state: _BatchState, what: str, extra: Optional[torch.Tensor] = None) -> None:
    """One device sync per check: raise for the first module (in execution order) and sample that went bad."""
    tensors = [flag for _, flag in flags] + ([extra] if extra is not None else [])
    if not tensors:
        return
    device = tensors[0].device
    if bool(torch.stack([t.all().to(device) for t in tensors]).all().item()):
        return
    _raise_non_finite(flags, state, what)
    bad = int((~extra).nonzero().flatten()[0].item())
    raise NonFiniteCalibrationError(
        f"non-finite loss for calibration sample {state.sample_offset + bad} (batch {state.batch_index}, "
        f"row {bad}) although every target input was finite"
    )


def compute_statistics(
    model: nn.Module,
    calibration_data: Iterable[Mapping[str, torch.Tensor]],
    config: Optional[TLoRAConfig] = None,
    *,
    targets: Optional[list[TargetModule]] = None,
    show_progress: bool = True,
    shard_batches: bool = True,
) -> TLoRAStatistics:
    """Run the calibration pass over `calibration_data` and return covariances and sensitivities.

    `calibration_data` is any iterable of batches (dicts with input_ids, attention_mask and labels). Under
    `torch.distributed` each rank processes the batches whose index modulo the world size is its rank (set
    `shard_batches=False` if each rank already iterates its own shard), and the sums are all-reduced so every rank
    returns identical statistics. The model's `requires_grad` flags and training mode are restored afterwards.
    """
    config = config or TLoRAConfig()
    targets = targets if targets is not None else find_target_modules(model, config)
    dtype = getattr(torch, config.statistics_dtype)
    statistics_device = torch.device(config.statistics_device) if config.statistics_device else None
    rank, world_size = distributed.rank_and_world_size()
    if not shard_batches:
        rank, world_size = 0, 1

    iterator = iter(calibration_data)
    first = next(iterator, None)
    if first is None:
        raise CalibrationError("calibration_data yielded no batches; TLoRA needs a few hundred training samples")
    _validate_batch(first, 0)

    device = _model_input_device(model)
    keys = _forward_keys(model)
    was_training = model.training
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    total_batches = len(calibration_data) if hasattr(calibration_data, "__len__") else None
    collector = None
    try:
        model.eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        layout = _probe_layout(model, targets, _prepare_inputs(first, device, keys))
        collector = _Collector(
            targets,
            layout,
            dtype=dtype,
            statistics_device=statistics_device,
            sensitivity_mode=config.sensitivity,
        )
        collector.attach()
        num_samples = num_tokens = num_sensitivity_samples = 0
        sample_offset = 0
        loss_kind: Optional[str] = None
        sample_by_sample = False
        skipped: list[int] = []
        progress = None
        if show_progress and rank == 0:
            from tqdm.auto import tqdm

            progress = tqdm(total=total_batches, desc="TLoRA calibration", unit="batch")
        for batch_index, batch in enumerate(itertools.chain([first], iterator)):
            _validate_batch(batch, batch_index)
            batch_size = _batch_size(batch)
            if batch_index % world_size != rank:
                sample_offset += batch_size
                if progress is not None:
                    progress.update(1)
                continue
            inputs = _prepare_inputs(batch, device, keys)
            mask = inputs["attention_mask"].bool()
            counts = mask.sum(dim=1)
            packed = None
            if mask.numel() and counts.sum().item() < 0.75 * mask.numel():
                packed = mask.reshape(-1).nonzero().flatten()
            state = _BatchState(
                batch_index=batch_index,
                sample_offset=sample_offset,
                mask=mask,
                counts=counts,
                positions=_sample_positions(mask),
                flat_valid=packed,
                all_valid=bool(mask.all().item()),
            )
            collector.state = state
            # Once the per-sample split of the loss is verified, the model need not compute its own loss as well.
            skip_model_loss = (
                loss_kind is not None and not sample_by_sample and batch_size > 1 and config.sensitivity == "per_sample"
                and not getattr(getattr(model, "config", None), "is_encoder_decoder", False)
            )
            forward_inputs = {k: v for k, v in inputs.items() if k != "labels"} if skip_model_loss else inputs
            with torch.enable_grad():
                state.collect_sensitivity = not sample_by_sample
                outputs = model(**forward_inputs)
                if not skip_model_loss and getattr(outputs, "loss", None) is None:
                    raise CalibrationError(
                        f"the model returned no loss for calibration batch {batch_index} although it has labels"
                    )
                losses, valid, total_loss, loss_kind, sample_by_sample = _losses_to_differentiate(
                    outputs, inputs, model, config.sensitivity, loss_kind, sample_by_sample
                )
                if sample_by_sample:
                    state.saved_inputs.clear()
                _check_flags(state.input_flags, state, "input", torch.isfinite(losses) | ~valid)
                if total_loss is not None:
                    total_loss.backward()
                del outputs, total_loss
            if sample_by_sample:
                _per_sample_passes(model, inputs, collector, state, valid)
            _check_flags(state.gradient_flags, state, "output gradient")
            valid_count = int(valid.sum().item())
            if valid_count < batch_size:
                rows = (~valid).nonzero().flatten().tolist()
                skipped.extend(sample_offset + row for row in rows)
            weights = valid.to(torch.float64)
            for name, values in state.per_sample_sensitivity.items():
                if name not in collector.sensitivity_sums:
                    collector.sensitivity_sums[name] = torch.zeros((), dtype=torch.float64, device=values.device)
                collector.sensitivity_sums[name] += (values * weights.to(values.device)).sum()
            num_samples += batch_size
            num_tokens += int(counts.sum().item())
            num_sensitivity_samples += valid_count
            sample_offset += batch_size
            collector.state = None
            if progress is not None:
                progress.update(1)
        if progress is not None:
            progress.close()
    finally:
        if collector is not None:
            collector.detach()
            collector.state = None
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(requires_grad.get(name, parameter.requires_grad))
        model.train(was_training)

    if skipped:
        logger.warning(
            "%d calibration samples have no label tokens (e.g. the response was cut off by cutoff_len) and do not "
            "count towards the sensitivity: %s",
            len(skipped),
            skipped[:20],
        )
    return _finalise(collector, targets, layout, num_samples, num_tokens, num_sensitivity_samples, config)


def _has_labels(labels: torch.Tensor) -> torch.Tensor:
    """Per sample: does it carry any label that enters the loss?"""
    if labels.dim() >= 2 and not labels.is_floating_point():
        return (labels.reshape(labels.shape[0], -1) != -100).any(dim=1)
    return torch.ones(labels.shape[0], dtype=torch.bool, device=labels.device)


def _losses_to_differentiate(outputs, inputs, model, mode: str, loss_kind, sample_by_sample: bool):
    """(per-sample losses for the finiteness check, which samples count, the scalar to backpropagate, the loss
    decomposition found, whether to fall back to one pass per sample)."""
    batch_size = inputs["input_ids"].shape[0]
    labelled = _has_labels(inputs["labels"])
    if getattr(outputs, "loss", None) is None:  # run without labels: the verified split gives the losses
        split = per_sample_losses(outputs, inputs, model, loss_kind)
        if split is None:
            raise CalibrationError(
                f"the per-sample split of the loss ({loss_kind}) verified on an earlier batch does not apply to this "
                "batch's logits and labels"
            )
        losses, valid, loss_kind = split
        return losses.detach(), valid, losses.sum(), loss_kind, False
    batch_loss = outputs.loss.detach().reshape(1).expand(batch_size)
    if mode == "batch" or sample_by_sample:
        return batch_loss, labelled, (None if sample_by_sample else outputs.loss), loss_kind, sample_by_sample
    if not bool(labelled.any().item()):
        return torch.zeros_like(batch_loss), labelled, None, loss_kind, False
    if batch_size == 1:
        return batch_loss, labelled, outputs.loss, loss_kind, False
    decomposed = per_sample_losses(outputs, inputs, model, loss_kind)
    if decomposed is None:
        logger.warning(
            "The model's loss could not be split into per-sample losses; TLoRA falls back to one forward and "
            "backward pass per sample (slower, same statistics)."
        )
        return batch_loss, labelled, None, loss_kind, True
    losses, valid, loss_kind = decomposed
    return losses.detach(), valid, losses.sum(), loss_kind, False


def _per_sample_passes(model, inputs, collector: _Collector, state: _BatchState, valid: torch.Tensor) -> None:
    """Fallback for losses that cannot be split: one forward and backward pass per labelled sample (the covariance
    was already collected by the batched pass)."""
    batch_size = valid.shape[0]
    state.collect_covariance = False
    state.collect_sensitivity = True
    positions, mask, counts = state.positions, state.mask, state.counts
    totals: dict[str, torch.Tensor] = {}
    for sample in range(batch_size):
        if not bool(valid[sample]):
            continue
        single = {
            key: value[sample : sample + 1] if torch.is_tensor(value) and value.dim() >= 1 else value
            for key, value in inputs.items()
        }
        state.mask, state.counts, state.positions = mask[sample : sample + 1], counts[sample : sample + 1], [
            positions[sample]
        ]
        state.calls.clear()
        state.per_sample_sensitivity = {}
        with torch.enable_grad():
            outputs = model(**single)
            outputs.loss.backward()
        for name, values in state.per_sample_sensitivity.items():
            totals.setdefault(name, torch.zeros(batch_size, dtype=torch.float64, device=values.device))
            totals[name][sample] = values[0]
    state.mask, state.counts, state.positions = mask, counts, positions
    state.per_sample_sensitivity = totals


def _finalise(
    collector: _Collector,
    targets: list[TargetModule],
    layout: dict,
    num_samples: int,
    num_tokens: int,
    num_sensitivity_samples: int,
    config: TLoRAConfig,
) -> TLoRAStatistics:
    """All-reduce the sums across ranks and package them."""
    for target in targets:
        if target.name not in collector.sensitivity_sums:
            collector.sensitivity_sums[target.name] = torch.zeros((), dtype=torch.float64)
    counts = torch.tensor([num_samples, num_tokens, num_sensitivity_samples], dtype=torch.float64)
    sensitivity = torch.stack([collector.sensitivity_sums[t.name].double().cpu() for t in targets])
    ordered_keys = sorted(collector.covariances)
    ordered_cross = sorted(collector.cross)
    if distributed.is_distributed():
        # Every rank must own a buffer for every statistic, even if it processed no batch.
        for target in targets:
            kind, key = layout[target.name]
            store = collector.covariances if kind == "covariance" else collector.cross
            if key not in store:
                shape = (target.in_features,) * 2 if kind == "covariance" else (target.out_features, target.in_features)
                device = collector.statistics_device or target.module.weight.device
                store[key] = torch.zeros(shape, dtype=collector.dtype, device=device)
        ordered_keys = sorted(collector.covariances)
        ordered_cross = sorted(collector.cross)
        distributed.all_reduce_sum_(
            [counts, sensitivity]
            + [collector.covariances[k] for k in ordered_keys]
            + [collector.cross[k] for k in ordered_cross]
        )
    records = []
    for target, total in zip(targets, sensitivity.tolist()):
        kind, key = layout[target.name]
        records.append(
            ModuleStatistics(
                name=target.name,
                kind=target.kind,
                out_features=target.out_features,
                in_features=target.in_features,
                layout=kind,
                covariance_key=key,
                sensitivity_sum=float(total),
                fingerprint=weight_fingerprint(target.module.weight),
            )
        )
    num_samples, num_tokens, num_sensitivity_samples = (int(round(v)) for v in counts.tolist())
    if num_sensitivity_samples == 0:
        raise CalibrationError("no calibration sample has a label token; the sensitivity is undefined")
    return TLoRAStatistics(
        modules=records,
        covariances={k: collector.covariances[k] for k in ordered_keys},
        cross_covariances={k: collector.cross[k] for k in ordered_cross},
        num_samples=num_samples,
        num_tokens=num_tokens,
        num_sensitivity_samples=num_sensitivity_samples,
        sensitivity_mode=config.sensitivity,
        dtype=config.statistics_dtype,
    )
