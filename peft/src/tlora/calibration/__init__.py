"""Step 1 of TLoRA: the calibration pass and everything it owns.

* run.py: the pass (`compute_statistics`), batch by batch, with the distributed sums;
* sensitivity.py: the sensitivity (its formula, modes, per-sample loss split, float16 loss scale, normalisation);
* hooks.py and batch_state.py: the forward/gradient hooks and the state of the batch they see;
* layout.py: which targets share one covariance (or store W C);
* statistics.py: `TLoRAStatistics`, the result (safetensors, checks, placement on devices);
* cache.py: the statistics cache (reused only for the same rows);
* batch_checks.py and devices.py: checks of every batch, and the batch's tensors on each device.
"""

from .cache import cached_statistics
from .run import PassShare, check_same_base_weights, compute_statistics, resolve_statistics_device
from ..config import SENSITIVITY_MODES, SensitivityMode
from .statistics import ModuleStatistics, TLoRAStatistics, place_statistics

__all__ = [
    "ModuleStatistics",
    "PassShare",
    "SENSITIVITY_MODES",
    "SensitivityMode",
    "TLoRAStatistics",
    "cached_statistics",
    "check_same_base_weights",
    "compute_statistics",
    "place_statistics",
    "resolve_statistics_device",
]
