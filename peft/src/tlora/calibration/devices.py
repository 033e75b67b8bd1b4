"""Models spread over several devices: the batch's index tensors as seen from each module's device, and statistics
placed on the devices they are used on."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:  # only for the annotations; the calibration code imports this module, not the other way round
    from .calibration_statistics import TLoRAStatistics
    from .targets import TargetModule


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


def statistics_devices(
    statistics: "TLoRAStatistics", targets: list["TargetModule"], statistics_device: Optional[torch.device] = None
) -> dict[str, torch.device]:
    """For every stored statistic (by key), the device it is used on: `statistics_device`, else the device of the
    first module that uses it."""
    by_name = {target.name: target for target in targets}
    devices: dict[str, torch.device] = {}
    for record in statistics.modules:
        key = record.covariance_key if record.layout == "covariance" else record.name
        if key not in devices and record.name in by_name:
            devices[key] = statistics_device or by_name[record.name].module.weight.device
    return devices


def place_statistics(
    statistics: "TLoRAStatistics", targets: list["TargetModule"], statistics_device: Optional[torch.device] = None
) -> "TLoRAStatistics":
    """The statistics with each tensor moved to the device it is used on (see `statistics_devices`)."""
    devices = statistics_devices(statistics, targets, statistics_device)
    placed = copy.copy(statistics)
    placed.covariances = {k: v.to(devices.get(k, v.device)) for k, v in statistics.covariances.items()}
    placed.cross_covariances = {k: v.to(devices.get(k, v.device)) for k, v in statistics.cross_covariances.items()}
    return placed
