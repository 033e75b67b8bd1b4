"""`BatchState`: what the calibration hooks know about the batch being processed (its mask, valid positions, what the
current pass collects, and what it produced), built in one place and reset by its own methods."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional

import torch

from .devices import BatchView, DeviceViews


def sample_positions(mask: torch.Tensor) -> list:
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


@dataclass
class BatchState:
    """What the hooks need to know about the batch being processed."""

    batch_index: int
    sample_offset: int
    mask: torch.Tensor  # (B, T) bool, on the model's input device
    counts: torch.Tensor  # (B,) valid positions per sample
    positions: list  # per sample: slice or index tensor of valid positions
    flat_valid: Optional[torch.Tensor]  # indices of valid rows in the flattened (B*T) view, when there is padding
    all_valid: bool = False  # no padding at all in this batch
    collect_covariance: bool = True
    collect_sensitivity: bool = True
    calls: dict = field(default_factory=dict)
    shared_inputs: dict = field(default_factory=dict)
    saved_inputs: dict = field(default_factory=dict)
    per_sample_sensitivity: dict = field(default_factory=dict)
    input_flags: list = field(default_factory=list)
    gradient_flags: list = field(default_factory=list)
    accumulated: int = 0  # statistics accumulated in this forward pass (a forward-only pass stops after its last)
    device_views: Optional[DeviceViews] = None  # the tensors above on other devices, built on first request

    def on(self, device: torch.device) -> BatchView:
        """mask, counts, positions and valid rows on `device` (a model spread over devices), cached per batch."""
        if device == self.mask.device:
            return BatchView(self.mask, self.counts, self.positions, self.flat_valid)
        if self.device_views is None:
            self.device_views = DeviceViews(BatchView(self.mask, self.counts, self.positions, self.flat_valid))
        return self.device_views.on(device)

    @classmethod
    def for_batch(cls, attention_mask: torch.Tensor, batch_index: int, sample_offset: int) -> "BatchState":
        """The state of a batch: its mask, valid positions per sample and, when there is padding, the valid rows."""
        mask = attention_mask.bool()
        counts = mask.sum(dim=1)
        packed = None
        # Any padding: the covariance products then skip the padded rows (their cost grows with the rows, the
        # copy that drops them is cheap next to them).
        if mask.numel() and counts.sum().item() < mask.numel():
            packed = mask.reshape(-1).nonzero().flatten()
        return cls(
            batch_index=batch_index,
            sample_offset=sample_offset,
            mask=mask,
            counts=counts,
            positions=sample_positions(mask),
            flat_valid=packed,
            all_valid=bool(mask.all().item()),
        )

    def collect(self, *, covariance: Optional[bool] = None, sensitivity: Optional[bool] = None) -> None:
        """Set what the next forward pass over the batch collects (None: as before)."""
        if covariance is not None:
            self.collect_covariance = covariance
        if sensitivity is not None:
            self.collect_sensitivity = sensitivity

    def drop_saved_inputs(self) -> None:
        """Forget the inputs kept for a backward pass that will not run (the loss is differentiated per sample)."""
        self.saved_inputs.clear()

    def reset_for_redo(self) -> None:
        """Forget what the batch's backward pass produced, before it is redone (sensitivity only: the covariance
        is already accumulated)."""
        self.calls.clear()
        self.saved_inputs.clear()
        self.per_sample_sensitivity = {}
        self.gradient_flags = []
        self.input_flags = []
        self.collect_covariance = False

    @contextmanager
    def single_sample(self, sample: int) -> Iterator[None]:
        """Within the block, the state describes sample `sample` alone (for a pass over that sample only)."""
        mask, counts, positions, flat_valid = self.mask, self.counts, self.positions, self.flat_valid
        views = self.device_views
        self.mask, self.counts, self.positions = mask[sample : sample + 1], counts[sample : sample + 1], [
            positions[sample]
        ]
        row = mask[sample]
        self.flat_valid = None if bool(row.all()) else row.nonzero().flatten()  # rows of this sample alone
        self.device_views = None
        try:
            yield
        finally:
            self.mask, self.counts, self.positions, self.flat_valid = mask, counts, positions, flat_valid
            self.device_views = views

    @contextmanager
    def sample_pass(self, sample: int) -> Iterator[None]:
        """A forward and backward pass over sample `sample` alone: its calls are counted afresh and the sensitivities
        it produces are kept in row `sample` of the batch's (zero for samples without a pass of their own)."""
        batch_size = self.mask.shape[0]
        batch_values, self.per_sample_sensitivity = self.per_sample_sensitivity, {}
        self.calls.clear()
        try:
            with self.single_sample(sample):
                yield
        finally:
            sample_values, self.per_sample_sensitivity = self.per_sample_sensitivity, batch_values
        for name, values in sample_values.items():
            row = batch_values.setdefault(name, torch.zeros(batch_size, dtype=torch.float64, device=values.device))
            row[sample] = values[0]
