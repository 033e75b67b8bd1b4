"""Each calibration sample's own loss, split out of the model's batch loss, and the scalar the pass backpropagates.

The sensitivity needs d loss_s / dW per sample s. Summing the per-sample mean losses of a batch and backpropagating
that sum gives every sample's gradient in one pass; the split is recomputed from the logits and accepted only if it
reproduces the model's own batch loss. When no split applies, the pass falls back to one backward pass per sample.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, NamedTuple, Optional

import torch
from torch import nn

from .errors import CalibrationError

logger = logging.getLogger(__name__)


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
    if mode == "batch" or sample_by_sample:
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
