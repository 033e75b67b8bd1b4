"""The sensitivity of every target module, all of it in this file: its definition, the modes, the per-sample loss
split it differentiates, the float16 loss scale and the normalisation.

    S_l = (1/N) sum_s g_{l,s},    g_{l,s} = mean_ij |W_ij * (d loss_s / dW)_ij|

with loss_s the mean token loss of calibration sample s and N the number of samples with a label.

* Modes (the option's values are declared with the option, `tlora.config.SENSITIVITY_MODES`): "per_sample" is the
  definition above at any batch size; "batch" takes one g from the weight gradient of each micro-batch's loss and
  gives it to every sample of the batch (an approximation, cheaper at large batches).
* The formula: `sample_sensitivities` turns a target's output gradient and saved input into g_{l,s}, called from the
  target's gradient hook (hooks.py).
* The loss split: summing the per-sample mean losses of a batch and backpropagating that sum gives every sample's
  gradient in one pass; the split is recomputed from the logits and accepted only if it reproduces the model's own
  batch loss. When no split applies, the pass falls back to one backward pass per sample.
* float16 models: the differentiated loss is multiplied by a loss scale so that small gradients do not underflow;
  g is divided by it again, and a batch whose scaled gradients overflow is redone with a lower scale.
* The normalisation: `normalised_sensitivity` divides the sum over the samples by N.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Callable, NamedTuple, Optional, Protocol

import torch
from torch import nn

from ..config import BATCH, PER_SAMPLE
from ..errors import CalibrationError
from .batch_state import BatchState

logger = logging.getLogger(__name__)



class WeightedModule(Protocol):
    """What the formula reads of a target module (`targets.TargetModule`): its kind and its weight W (out x in)."""

    kind: str  # "linear" (W stored out x in) or "conv1d" (stored in x out)

    def weight_matrix(self, dtype: torch.dtype, copy: bool = True) -> torch.Tensor:
        """W (out x in) in `dtype`."""


def normalised_sensitivity(sensitivity_sum: float, num_samples: int) -> float:
    """S_l = (1/N) sum_s g_{l,s}, with N the number of samples that count (at least 1)."""
    return sensitivity_sum / max(1, num_samples)


# ---------------------------------------------------------------------------------------------------------------
# The formula: g_{l,s} from a target's output gradient and input
# ---------------------------------------------------------------------------------------------------------------


def gradient_dtype(inputs: torch.Tensor, statistics_dtype: torch.dtype) -> torch.dtype:
    """Per-sample weight gradients are formed in the statistics dtype, except for half-precision models on an
    accelerator, where they are formed in the model's dtype as autograd's own weight gradients would be (the
    L1 reduction still accumulates in float32)."""
    if inputs.device.type != "cpu" and inputs.dtype in (torch.bfloat16, torch.float16):
        return inputs.dtype
    return statistics_dtype


def sample_sensitivities(
    mode: str, target: WeightedModule, inputs: torch.Tensor, grad_output: torch.Tensor, state: BatchState,
    statistics_dtype: torch.dtype,
) -> torch.Tensor:
    """g_{l,s} = mean_ij |W_ij (d loss_s / dW)_ij| for every sample s of the batch (float64, one per sample)."""
    weight = _stored_weight(target, gradient_dtype(inputs, statistics_dtype))
    values = torch.zeros(grad_output.shape[0], dtype=torch.float64, device=grad_output.device)
    if mode == PER_SAMPLE:
        _fill_per_sample_sensitivity(values, target, weight, inputs, grad_output, state)
    else:
        _fill_batch_sensitivity(values, target, weight, inputs, grad_output, state)
    return values


def _fill_per_sample_sensitivity(
    values: torch.Tensor, target: WeightedModule, weight: torch.Tensor, inputs: torch.Tensor, grad_output: torch.Tensor,
    state: BatchState,
) -> None:
    """values_s = sample s's sensitivity from its own gradient dl_s/dW = delta_s^T X_s, formed in turn in one
    reused buffer."""
    positions = state.on(grad_output.device).positions
    input_positions = state.on(inputs.device).positions
    gradient = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    for sample, where in enumerate(positions):
        delta = grad_output[sample, where].to(weight.dtype)
        if delta.shape[0] == 0:
            continue
        inputs_s = inputs[sample, input_positions[sample]].detach().to(device=weight.device, dtype=weight.dtype)
        # dl_s/dW for this sample only, in the weight's own layout, consumed at once.
        left, right = (delta, inputs_s) if target.kind == "linear" else (inputs_s, delta)
        values[sample] = _mean_weighted_l1(torch.mm(left.t(), right, out=gradient), weight)
    del gradient


def _fill_batch_sensitivity(
    values: torch.Tensor, target: WeightedModule, weight: torch.Tensor, inputs: torch.Tensor, grad_output: torch.Tensor,
    state: BatchState,
) -> None:
    """values_s = the batch's sensitivity from the weight gradient of the batch loss, for every sample."""
    flat_grad = grad_output.reshape(-1, grad_output.shape[-1])
    flat_inputs = inputs.detach().reshape(-1, inputs.shape[-1])
    delta = flat_grad[state.on(flat_grad.device).mask.reshape(-1)].to(weight.dtype)
    rows = flat_inputs[state.on(flat_inputs.device).mask.reshape(-1)].to(device=weight.device, dtype=weight.dtype)
    gradient = delta.t() @ rows if target.kind == "linear" else rows.t() @ delta
    values[:] = _mean_weighted_l1(gradient, weight)
    del gradient


def _stored_weight(target: WeightedModule, dtype: torch.dtype) -> torch.Tensor:
    """W in the module's own storage layout (transposed for Conv1D), in `dtype`."""
    weight = target.weight_matrix(dtype, copy=False)
    return weight if target.kind == "linear" else weight.t()


def _mean_weighted_l1(gradient: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """mean_ij |W_ij G_ij|, overwriting `gradient`; the reduction accumulates in at least float32."""
    reduce_dtype = torch.promote_types(weight.dtype, torch.float32)
    # abs_ + sum: one fused pass each, about 3x faster on CPU than linalg.vector_norm(ord=1) with a dtype.
    return gradient.mul_(weight).abs_().sum(dtype=reduce_dtype) / weight.numel()


# ---------------------------------------------------------------------------------------------------------------
# Loss scaling (float16 models)
# ---------------------------------------------------------------------------------------------------------------

FP16_INITIAL_LOSS_SCALE = 2.0**16  # as torch.amp.GradScaler's default
LOSS_SCALE_BACKOFF = 2.0**4  # the scale is divided by this on an overflow and the batch's backward pass redone


def initial_loss_scale(model: nn.Module) -> float:
    """The loss scale the calibration backward pass starts with: FP16_INITIAL_LOSS_SCALE for float16 models, else 1."""
    if not any(parameter.dtype == torch.float16 for parameter in model.parameters()):
        return 1.0
    logger.info(
        "float16 model: the TLoRA calibration backward pass multiplies each loss by a loss scale (starting at %g, "
        "divided by %g on an overflow) and divides |W * G| by it, so that small gradients do not underflow.",
        FP16_INITIAL_LOSS_SCALE,
        LOSS_SCALE_BACKOFF,
    )
    return FP16_INITIAL_LOSS_SCALE


def _gradients_finite(state: BatchState) -> bool:
    """Whether every per-sample sensitivity of the batch is finite (one device sync)."""
    flags = [flag.all() for _, flag in state.gradient_flags]
    return not flags or bool(torch.stack([f.to(flags[0].device) for f in flags]).all().item())


def unscale(state: BatchState, loss_scale: float, redo_backward: Callable[[float], None]) -> float:
    """Divide the batch's sensitivities by the loss scale; while the scaled gradients overflow, lower the scale and
    redo the batch's backward pass with `redo_backward(scale)` (sensitivity only: the covariance is already
    accumulated). Returns the scale the batch ended with (the next batch starts from it)."""
    while loss_scale > 1.0 and not _gradients_finite(state):
        loss_scale = max(1.0, loss_scale / LOSS_SCALE_BACKOFF)
        logger.info("TLoRA calibration: gradients overflowed in batch %d; loss scale lowered to %g and the batch's "
                    "backward pass redone.", state.batch_index, loss_scale)
        state.reset_for_redo()
        redo_backward(loss_scale)
    if loss_scale != 1.0:
        for values in state.per_sample_sensitivity.values():
            values.div_(loss_scale)
    return loss_scale


# ---------------------------------------------------------------------------------------------------------------
# The per-sample loss split
# ---------------------------------------------------------------------------------------------------------------


class LossesToDifferentiate(NamedTuple):
    """What a batch's forward pass gives the calibration pass to check and to backpropagate."""

    losses: torch.Tensor  # per sample, detached, for the finiteness check
    valid: torch.Tensor  # per sample: does it count towards the sensitivity
    total: Optional[torch.Tensor]  # the scalar to backpropagate (None: no batched backward pass)
    kind: Optional[str]  # the loss decomposition found so far
    sample_by_sample: bool  # fall back to one forward and backward pass per sample


def _close(value: torch.Tensor, reference: torch.Tensor) -> bool:
    """Whether a recomputed batch loss matches the model's own."""
    return bool(torch.isclose(value.double(), reference.detach().double(), rtol=1e-3, atol=1e-5).item())


def _candidate_kinds(logits: torch.Tensor, labels: torch.Tensor, model: nn.Module) -> list[str]:
    """The decompositions that fit the shapes of the logits and labels."""
    if labels.dim() == 2 and logits.dim() == 3 and labels.shape == logits.shape[:2]:
        return ["causal", "token"]
    if labels.dim() >= 1 and logits.dim() == 2 and labels.shape[0] == logits.shape[0]:
        problem = getattr(getattr(model, "config", None), "problem_type", None)
        return [problem.replace("_classification", "")] if problem else ["single_label", "regression"]
    return []


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
    labels = labels.to(logits.device)  # a model spread over devices: the head's device, not the embeddings'
    if reference is None:
        # A decomposition already verified on an earlier batch: the model was run without labels.
        if kind is None:
            return None
        result = _decompose(kind, logits, labels)
        return None if result is None else (result[0], result[1], kind)
    candidates = [kind] if kind is not None else _candidate_kinds(logits, labels, model)
    for candidate in candidates:
        result = _decompose(candidate, logits, labels)
        if result is None:
            continue
        losses, valid, batch_mean = result
        if _close(batch_mean, reference):
            return losses, valid, candidate
    return None


def _token_losses(kind: str, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(per-sample mean token losses, valid, batch mean) of a causal or token-classification loss."""
    if kind == "causal":
        # Shift the labels, not the logits: position t predicts token t + 1 (as transformers' ForCausalLMLoss).
        labels = nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    batch, length, vocabulary = logits.shape
    # Only the labelled positions: the log-softmax over the vocabulary (and its backward) skips prompt and padding.
    flat_labels = labels.reshape(-1)
    labelled = (flat_labels != -100).nonzero().flatten()
    token_losses = nn.functional.cross_entropy(
        logits.reshape(batch * length, vocabulary).index_select(0, labelled).float(), flat_labels[labelled],
        reduction="none",
    )
    counts = (labels != -100).sum(dim=1)
    sums = token_losses.new_zeros(batch).index_add_(0, labelled // length, token_losses)
    valid = counts > 0
    losses = torch.where(valid, sums / counts.clamp_min(1), torch.zeros_like(sums))
    batch_mean = sums.sum() / counts.sum().clamp_min(1)
    return losses, valid, batch_mean


def _sequence_losses(kind: str, logits: torch.Tensor, labels: torch.Tensor) -> Optional[torch.Tensor]:
    """Per-sample losses of a sequence-level head (classification or regression), or None if `kind` does not fit."""
    functional = nn.functional
    if kind == "single_label":
        if labels.dim() != 1 or labels.dtype not in (torch.long, torch.int):
            return None
        return functional.cross_entropy(logits.float(), labels, reduction="none")
    if kind == "regression":
        if logits.shape[-1] == 1:
            return (logits.float().squeeze(-1) - labels.float().view(-1)) ** 2
        return ((logits.float() - labels.float()) ** 2).mean(dim=-1)
    if kind == "multi_label":
        losses = functional.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none")
        return losses.mean(dim=-1)
    return None


def _decompose(kind: str, logits: torch.Tensor, labels: torch.Tensor) -> Optional[tuple[torch.Tensor, ...]]:
    """(per-sample losses, valid, batch mean) under the decomposition `kind`, or None if it does not apply."""
    if kind in ("causal", "token"):
        return _token_losses(kind, logits, labels)
    losses = _sequence_losses(kind, logits, labels)
    if losses is None:
        return None
    return losses, torch.ones_like(losses, dtype=torch.bool), losses.mean()


def _has_labels(labels: torch.Tensor) -> torch.Tensor:
    """Per sample: does it carry any label that enters the loss?"""
    if labels.dim() >= 2 and not labels.is_floating_point():
        return (labels.reshape(labels.shape[0], -1) != -100).any(dim=1)
    return torch.ones(labels.shape[0], dtype=torch.bool, device=labels.device)


def _verified_split(outputs: Any, inputs: Mapping[str, torch.Tensor], model: nn.Module, kind: Optional[str]):
    """The losses of a batch run without labels, through the split verified on an earlier batch."""
    split = per_sample_losses(outputs, inputs, model, kind)
    if split is None:
        raise CalibrationError(
            f"the per-sample split of the loss ({kind}) verified on an earlier batch does not apply to this "
            "batch's logits and labels"
        )
    losses, valid, kind = split
    return LossesToDifferentiate(losses.detach(), valid, losses.sum(), kind, False)


def losses_to_differentiate(
    outputs: Any,
    inputs: Mapping[str, torch.Tensor],
    model: nn.Module,
    mode: str,
    loss_kind: Optional[str],
    sample_by_sample: bool,
) -> LossesToDifferentiate:
    """The per-sample losses, the samples that count and the scalar to backpropagate for one batch's outputs."""
    batch_size = inputs["input_ids"].shape[0]
    if getattr(outputs, "loss", None) is None:  # run without labels: the verified split gives the losses
        return _verified_split(outputs, inputs, model, loss_kind)
    batch_loss = outputs.loss.detach().reshape(1).expand(batch_size)
    labelled = _has_labels(inputs["labels"]).to(batch_loss.device)  # beside the losses on a multi-device model
    if mode == BATCH or sample_by_sample:
        total = None if sample_by_sample else outputs.loss
        return LossesToDifferentiate(batch_loss, labelled, total, loss_kind, sample_by_sample)
    if not bool(labelled.any().item()):
        return LossesToDifferentiate(torch.zeros_like(batch_loss), labelled, None, loss_kind, False)
    if batch_size == 1:
        return LossesToDifferentiate(batch_loss, labelled, outputs.loss, loss_kind, False)
    decomposed = per_sample_losses(outputs, inputs, model, loss_kind)
    if decomposed is None:
        logger.warning(
            "The model's loss could not be split into per-sample losses; TLoRA falls back to one forward and "
            "backward pass per sample (slower, same statistics)."
        )
        return LossesToDifferentiate(batch_loss, labelled, None, loss_kind, True)
    losses, valid, loss_kind = decomposed
    return LossesToDifferentiate(losses.detach(), valid, losses.sum(), loss_kind, False)
