"""Models spread over several devices: the batch's index tensors (mask, counts, positions, valid rows) as seen from
each module's device, copied once per batch and device."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class BatchView:
    """The batch's mask, per-sample counts, positions and valid rows, all on one device."""

    mask: torch.Tensor
    counts: torch.Tensor
    positions: list
    flat_valid: Optional[torch.Tensor]


def _move_position(position, device: torch.device):
    """A slice as it is, an index tensor on `device`."""
    return position.to(device) if torch.is_tensor(position) else position


class DeviceViews:
    """Views of one batch's tensors per device, created on first request and reused for the rest of the batch."""

    def __init__(self, source: BatchView):
        self.source = source
        self.views: dict[torch.device, BatchView] = {source.mask.device: source}

    def on(self, device: torch.device) -> BatchView:
        """The batch's tensors on `device` (the source itself on its own device)."""
        view = self.views.get(device)
        if view is None:
            source = self.source
            view = BatchView(
                mask=source.mask.to(device),
                counts=source.counts.to(device),
                positions=[_move_position(p, device) for p in source.positions],
                flat_valid=None if source.flat_valid is None else source.flat_valid.to(device),
            )
            self.views[device] = view
        return view
