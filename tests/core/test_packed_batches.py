"""Packed rows (several sequences in one row, position_ids restarting) are refused with an error saying what to do."""

import pytest
import torch

from conftest import LLAMA_TARGETS, pad_batches
from tlora import TLoRAConfig, compute_statistics
from tlora.errors import CalibrationError


def _config():
    return TLoRAConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, task_type="CAUSAL_LM")


def _packed(samples):
    """Two samples per row, concatenated, with position_ids restarting at the second and no attention_mask."""
    rows = []
    for first, second in zip(samples[0::2], samples[1::2]):
        ids = torch.cat([first["input_ids"], second["input_ids"]])
        labels = torch.cat([first["labels"], second["labels"]])
        positions = torch.cat([torch.arange(len(first["input_ids"])), torch.arange(len(second["input_ids"]))])
        rows.append((ids, labels, positions))
    length = min(len(ids) for ids, _, _ in rows)
    return [
        {
            "input_ids": torch.stack([ids[:length] for ids, _, _ in rows]),
            "labels": torch.stack([labels[:length] for _, labels, _ in rows]),
            "position_ids": torch.stack([positions[:length] for _, _, positions in rows]),
        }
    ]


def test_packed_rows_are_refused_with_a_clear_error(llama, samples):
    with pytest.raises(CalibrationError, match=r"row 0 packs several sequences.*unpacked rows"):
        compute_statistics(llama, _packed(samples), _config(), show_progress=False)


def test_left_padded_rows_with_restarting_padding_positions_are_accepted(llama, samples):
    batches = pad_batches(samples, 3, side="left")
    for batch in batches:
        mask = batch["attention_mask"]
        batch["position_ids"] = (mask.cumsum(dim=1) - 1).masked_fill(mask == 0, 1)
    statistics = compute_statistics(llama, batches, _config(), show_progress=False)
    assert statistics.num_samples == len(samples)
