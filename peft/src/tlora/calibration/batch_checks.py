"""Checks of every calibration batch before it enters the model: its form, its attention mask, its token ids, the
shape of its labels and, for a causal LM, a predicted token in every row. All are cheap (no forward pass); each
error names the batch and the row and says what to fix."""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any, Optional

import torch
from torch import nn

from ..errors import CalibrationError

IGNORE_INDEX = -100  # the label of a position that does not enter the loss (transformers' convention)


@dataclass(frozen=True)
class BatchRules:
    """What a batch must satisfy for this model: the vocabulary size, and whether labels are causal-LM tokens."""

    vocab_size: Optional[int] = None  # rows of the input embedding (None: not checked)
    causal: bool = False  # labels are the input tokens, predicted one position later
    encoder_decoder: bool = False  # labels belong to the decoder, not to input_ids

    @classmethod
    def for_model(cls, model: nn.Module, task_type: Optional[str] = None) -> "BatchRules":
        """The rules for `model` (a causal LM when `task_type` says so or the model can generate on its own)."""
        try:
            embeddings = model.get_input_embeddings()
        except (AttributeError, NotImplementedError):  # not a transformers model, or one without input embeddings
            embeddings = None
        vocab_size = getattr(embeddings, "num_embeddings", None)
        encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
        generates = bool(model.can_generate()) if hasattr(model, "can_generate") else False
        causal = not encoder_decoder and (str(task_type).endswith("CAUSAL_LM") or generates)
        return cls(vocab_size=int(vocab_size) if vocab_size else None, causal=causal, encoder_decoder=encoder_decoder)


def validate_batch(batch: Any, index: int, rules: Optional[BatchRules] = None) -> None:
    """Raise `CalibrationError` unless `batch` is a dict with input_ids (batch, sequence) and labels that fit them."""
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
    rules = rules or BatchRules()
    _check_attention_mask(batch, index)
    _check_label_shape(batch, index, rules)
    _check_token_ids(batch["input_ids"], index, rules.vocab_size)
    if rules.causal:
        _check_predicted_tokens(batch, index)
    reject_packed(batch, index)


def _first_bad_row(ok: torch.Tensor) -> Optional[int]:
    """The first row whose flag is False, or None (one device sync)."""
    if bool(ok.all().item()):
        return None
    return int((~ok).nonzero().flatten()[0].item())


def _check_attention_mask(batch: Mapping[str, Any], index: int) -> None:
    """The attention mask, if given, has the shape of input_ids and at least one valid position in every row."""
    mask = batch.get("attention_mask")
    if mask is None:
        return
    ids = batch["input_ids"]
    if not torch.is_tensor(mask) or tuple(mask.shape) != tuple(ids.shape):
        shape = tuple(mask.shape) if torch.is_tensor(mask) else type(mask).__name__
        raise CalibrationError(
            f"calibration batch {index}: attention_mask has shape {shape} but input_ids {tuple(ids.shape)}; pad "
            "both with the same collator"
        )
    row = _first_bad_row(mask.bool().any(dim=1))
    if row is not None:
        raise CalibrationError(
            f"calibration batch {index}, row {row} has an all-zero attention_mask (an empty sample: no token to "
            "calibrate on); drop empty rows from the calibration data"
        )


def _check_label_shape(batch: Mapping[str, Any], index: int, rules: BatchRules) -> None:
    """Token labels have the shape of input_ids; sequence labels have one entry (or one vector) per row."""
    ids, labels = batch["input_ids"], batch["labels"]
    if not torch.is_tensor(labels) or labels.dim() == 0 or labels.shape[0] != ids.shape[0]:
        shape = tuple(labels.shape) if torch.is_tensor(labels) else type(labels).__name__
        count = labels.shape[0] if torch.is_tensor(labels) and labels.dim() else 0
        missing = f", row {count} has none" if count < ids.shape[0] else ""
        raise CalibrationError(
            f"calibration batch {index}: labels of shape {shape} for the {ids.shape[0]} rows of input_ids "
            f"{tuple(ids.shape)}{missing}; give one label row per input row (collate input_ids and labels together)"
        )
    if rules.encoder_decoder:
        return  # decoder labels: their length is the decoder's own
    token_labels = labels.dim() == 2 and not labels.is_floating_point() and (rules.causal or labels.shape[1] != 1)
    if (token_labels or rules.causal) and tuple(labels.shape) != tuple(ids.shape):
        length = labels.shape[1] if labels.dim() > 1 else 1
        raise CalibrationError(
            f"calibration batch {index}, row 0: {length} token labels for {ids.shape[1]} input_ids (labels "
            f"{tuple(labels.shape)}, input_ids {tuple(ids.shape)}); every row needs one label per token, padded with "
            f"{IGNORE_INDEX} as input_ids are padded (e.g. DataCollatorForSeq2Seq(label_pad_token_id={IGNORE_INDEX}))"
        )


def _check_token_ids(ids: torch.Tensor, index: int, vocab_size: Optional[int]) -> None:
    """Every token id is an index into the model's input embedding."""
    if vocab_size is None:
        return
    ids = ids.detach()
    row = _first_bad_row(((ids >= 0) & (ids < vocab_size)).all(dim=1))
    if row is not None:
        bad = ids[row][(ids[row] < 0) | (ids[row] >= vocab_size)]
        raise CalibrationError(
            f"calibration batch {index}, row {row} has token id {int(bad[0])}, outside the model's vocabulary of "
            f"{vocab_size} input embeddings; tokenize with the model's own tokenizer, or call "
            "model.resize_token_embeddings(len(tokenizer)) after adding tokens"
        )


def _check_predicted_tokens(batch: Mapping[str, Any], index: int) -> None:
    """Every row of a causal LM batch has a labelled token predicted from a valid position (label t+1 from t)."""
    labels = batch["labels"].detach()
    mask = batch.get("attention_mask")
    predicted = labels[:, 1:] != IGNORE_INDEX
    if torch.is_tensor(mask):
        predicted &= mask[:, :-1].detach().bool().to(predicted.device)
    row = _first_bad_row(predicted.any(dim=1))
    if row is not None:
        raise CalibrationError(
            f"calibration batch {index}, row {row} has no predicted token: a causal LM predicts token t+1 from "
            f"position t, so a row needs a label other than {IGNORE_INDEX} after its first valid token (a one-token "
            "sample, or one whose response was cut off, has none); drop such rows from the calibration data"
        )


def reject_packed(batch: Mapping[str, Any], index: int) -> None:
    """Raise `CalibrationError` if a row holds several packed sequences (its position_ids restart inside the row's
    valid positions); TLoRA centres and differentiates per sample, so a packed row would silently count as one."""
    positions = batch.get("position_ids")
    if not torch.is_tensor(positions) or positions.dim() != 2 or positions.shape[1] < 2:
        return
    positions = positions.to("cpu", torch.int64).expand(batch["input_ids"].shape)
    mask = batch.get("attention_mask")
    valid = mask.to("cpu").bool() if torch.is_tensor(mask) else torch.ones_like(positions, dtype=torch.bool)
    for row in range(positions.shape[0]):
        values = positions[row][valid[row]]
        restarts = (values[1:] <= values[:-1]).nonzero().flatten()
        if restarts.numel():
            raise CalibrationError(
                f"calibration batch {index}, row {row} packs several sequences (its position_ids restart after "
                f"valid token {int(restarts[0]) + 1}); TLoRA centres inputs and takes the sensitivity per sample, so "
                "a packed row would count as one sample. Calibrate on unpacked rows: one sample per row, padded, "
                "with an attention_mask (e.g. DataCollatorForSeq2Seq, not DataCollatorWithFlattening or packing)"
            )
