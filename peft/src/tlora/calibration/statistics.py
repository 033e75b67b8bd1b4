"""The result of the calibration pass: per-module covariances (or W C products) and sensitivities, saved to and
loaded from safetensors, checked against the model they are applied to, and placed on the devices they are used on."""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import StatisticsMismatchError
from ..targets import TargetModule
from ..config import PER_SAMPLE
from .sensitivity import normalised_sensitivity

logger = logging.getLogger(__name__)

STATISTICS_FORMAT = "tlora-statistics"
STATISTICS_VERSION = 2  # 2: the header records a SHA-256 digest of the tensors ("tensors_sha256")
CALIBRATION_PREFIX = "calibration."  # safetensors header keys that record the calibration rows, seed and cut-off
TENSORS_DIGEST_KEY = "tensors_sha256"


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in the order of the sorted names."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().contiguous().cpu()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def _unreadable(path: Path, error: BaseException) -> StatisticsMismatchError:
    """The error for a statistics file that cannot be read (truncated, not safetensors, malformed header)."""
    return StatisticsMismatchError(
        f"the statistics file {path} cannot be read ({type(error).__name__}: {error}); it is truncated, damaged or "
        "not a TLoRA statistics file: delete it to recalibrate"
    )


def _read_tensors(path: Path, require_digest: bool) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The header metadata and the tensors of a statistics file, on the CPU, with the format and digest checked."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != STATISTICS_FORMAT:
                raise StatisticsMismatchError(f"{path} is not a TLoRA statistics file")
            if int(metadata.get("version", "0")) > STATISTICS_VERSION:
                raise StatisticsMismatchError(f"{path} was written by a newer tlora (format {metadata['version']})")
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except StatisticsMismatchError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise _unreadable(path, error) from error
    _check_digest(metadata, tensors, path, require_digest)
    return metadata, tensors


def _check_digest(metadata: dict[str, str], tensors: dict[str, torch.Tensor], path: Path, required: bool) -> None:
    """Raise `StatisticsMismatchError` if the tensors differ from the digest in the header (which a file of format
    version 2 or later, or any file when `required`, must have)."""
    recorded = metadata.get(TENSORS_DIGEST_KEY)
    if recorded is None:
        if required or int(metadata.get("version", "0")) >= 2:
            raise StatisticsMismatchError(
                f"the statistics file {path} has no digest of its tensors in its header (written by an older tlora, "
                "or damaged), so they cannot be checked; delete it to recalibrate"
            )
        logger.warning("%s was written by an older tlora and has no digest of its tensors; they are not checked.", path)
        return
    if tensors_digest(tensors) != recorded:
        raise StatisticsMismatchError(
            f"the tensors of the statistics file {path} do not match the SHA-256 digest in its header (the file was "
            "changed or damaged after it was written); delete it to recalibrate"
        )


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
    sensitivity_mode: str = PER_SAMPLE
    dtype: str = "float32"
    extra: dict = field(default_factory=dict)
    calibration: dict[str, str] = field(default_factory=dict)  # which rows made them (see cache.py)

    def module(self, name: str) -> ModuleStatistics:
        """The record of module `name` (KeyError if absent)."""
        for record in self.modules:
            if record.name == name:
                return record
        raise KeyError(name)

    @property
    def module_names(self) -> list[str]:
        """Names of the modules, in model order."""
        return [record.name for record in self.modules]

    def sensitivity(self, name: str) -> float:
        """S_l of module `name` (its sum normalised as `sensitivity.normalised_sensitivity` says)."""
        return normalised_sensitivity(self.module(name).sensitivity_sum, self.num_sensitivity_samples)

    def sensitivities(self) -> dict[str, float]:
        """S_l of every module, by name."""
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

    def collected_modules(self) -> set[str]:
        """Names of the modules whose statistic is present (all of them, except in one pass of statistics_passes)."""
        return {
            record.name
            for record in self.modules
            if (record.covariance_key in self.covariances if record.layout == "covariance"
                else record.name in self.cross_covariances)
        }

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
        """The JSON description stored beside the tensors."""
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
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"covariance::{k}": v.detach().contiguous().cpu() for k, v in self.covariances.items()}
        tensors.update({f"cross::{k}": v.detach().contiguous().cpu() for k, v in self.cross_covariances.items()})
        metadata = {
            "format": STATISTICS_FORMAT,
            "version": str(STATISTICS_VERSION),
            "statistics": json.dumps(self._metadata()),
            TENSORS_DIGEST_KEY: tensors_digest(tensors),
        }
        metadata.update({CALIBRATION_PREFIX + key: str(value) for key, value in self.calibration.items()})
        temporary = path.with_name(path.name + ".tmp")
        save_file(tensors, str(temporary), metadata=metadata)
        temporary.replace(path)
        return path

    @classmethod
    def load(
        cls, path: str | Path, device: str | torch.device = "cpu", require_digest: bool = False
    ) -> "TLoRAStatistics":
        """Read statistics written by `save` (`StatisticsMismatchError` for a damaged or unreadable file, or with
        `require_digest` for one without a digest of its tensors)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no statistics file at {path}")
        metadata, tensors = _read_tensors(path, require_digest)
        tensors = {key: value.to(device) for key, value in tensors.items()}
        try:
            description = json.loads(metadata["statistics"])
            modules = [ModuleStatistics(**record) for record in description["modules"]]
            counts = [description[key] for key in ("num_samples", "num_tokens", "num_sensitivity_samples")]
            mode, dtype = description["sensitivity_mode"], description["dtype"]
            extra = description.get("extra", {})
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise _unreadable(path, error) from error
        covariances = {k.split("::", 1)[1]: v for k, v in tensors.items() if k.startswith("covariance::")}
        cross = {k.split("::", 1)[1]: v for k, v in tensors.items() if k.startswith("cross::")}
        return cls(
            modules=modules,
            covariances=covariances,
            cross_covariances=cross,
            num_samples=counts[0],
            num_tokens=counts[1],
            num_sensitivity_samples=counts[2],
            sensitivity_mode=mode,
            dtype=dtype,
            extra=extra,
            calibration={k[len(CALIBRATION_PREFIX) :]: v for k, v in metadata.items() if k.startswith(CALIBRATION_PREFIX)},
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
            if check_weights and record.fingerprint != target.fingerprint():
                raise StatisticsMismatchError(
                    f"the weights of {target.name} differ from those the statistics were computed on "
                    "(another checkpoint?); recompute the statistics for this model"
                )


def statistics_devices(
    statistics: TLoRAStatistics, targets: list[TargetModule], statistics_device: Optional[torch.device] = None
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
    statistics: TLoRAStatistics, targets: list[TargetModule], statistics_device: Optional[torch.device] = None
) -> TLoRAStatistics:
    """The statistics with each tensor moved to the device it is used on (see `statistics_devices`)."""
    devices = statistics_devices(statistics, targets, statistics_device)
    placed = copy.copy(statistics)
    placed.covariances = {k: v.to(devices.get(k, v.device)) for k, v in statistics.covariances.items()}
    placed.cross_covariances = {k: v.to(devices.get(k, v.device)) for k, v in statistics.cross_covariances.items()}
    return placed
