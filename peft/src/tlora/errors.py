"""The errors of the calibration pass and of the statistics it saves."""

from __future__ import annotations


class CalibrationError(ValueError):
    """Calibration data or model that TLoRA cannot calibrate on."""


class NonFiniteCalibrationError(FloatingPointError):
    """A NaN or Inf appeared during calibration; the message names the module and the sample."""


class StatisticsMismatchError(ValueError):
    """Saved statistics do not belong to this model or these target modules."""


class DecompositionError(RuntimeError):
    """The decomposition of W C failed for a module; the message names the module (and the rank that computed it)."""
