"""The statistics cache: reuse a saved calibration pass only for the same rows, and decide it once for all ranks.

A cache file records, in its safetensors header, a SHA-256 digest of the calibration rows actually used (each
row's token ids and labels at its attention-masked positions, so batching and padding do not change it), their
number and, where the caller knows them, the seed that drew them and the cut-off length. A cache whose record
differs from the rows given now is an error that says what changed; so is one computed with another sensitivity
mode or statistics dtype, one whose tensors differ from the SHA-256 digest in its header, and one that cannot be
read. Before a fresh calibration pass, the cache's folder is checked to be writable. Under `torch.distributed`
rank 0 decides whether the cache is used and every rank follows; a rank that lacks the file rank 0 has fails on
every rank (put the cache on a filesystem all ranks see, or copy it to each node).
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from .. import distributed
from ..config import TLoRAConfig
from ..errors import CalibrationError, StatisticsMismatchError
from ..targets import TargetModule
from .run import compute_statistics
from .statistics import TLoRAStatistics

logger = logging.getLogger(__name__)


class RowDigest:
    """A running SHA-256 over calibration rows (token ids and labels at valid positions) and their count."""

    def __init__(self):
        self.hash = hashlib.sha256()
        self.rows = 0

    def update(self, batch: Mapping[str, Any]) -> None:
        """Add every row of `batch` (a dict with input_ids, optional attention_mask and labels)."""
        ids = batch["input_ids"].detach().to("cpu", torch.int64)
        mask = batch.get("attention_mask")
        valid = mask.detach().to("cpu").bool() if torch.is_tensor(mask) else torch.ones_like(ids, dtype=torch.bool)
        labels = batch.get("labels")
        labels = labels.detach().cpu() if torch.is_tensor(labels) else None
        for row in range(ids.shape[0]):
            tokens = ids[row][valid[row]]
            self.hash.update(len(tokens).to_bytes(8, "little") + tokens.numpy().tobytes())
            if labels is not None:
                row_labels = labels[row][valid[row]] if labels.shape == ids.shape else labels[row]
                self.hash.update(row_labels.to(torch.float64 if row_labels.is_floating_point() else torch.int64)
                                 .numpy().tobytes())
            self.rows += 1

    def wrap(self, batches: Iterable[Mapping[str, Any]]) -> Iterable[Mapping[str, Any]]:
        """`batches`, digested as they are iterated (keeps `len` when `batches` has one)."""
        return _DigestedSized(batches, self) if hasattr(batches, "__len__") else _Digested(batches, self)

    def record(self, seed: Optional[int] = None, cutoff_len: Optional[int] = None) -> dict[str, str]:
        """The cache's calibration record: digest and count of the rows, and seed and cut-off where known."""
        record = {"rows": str(self.rows), "rows_sha256": self.hash.hexdigest()}
        if seed is not None:
            record["seed"] = str(seed)
        if cutoff_len is not None:
            record["cutoff_len"] = str(cutoff_len)
        return record


class _Digested:
    """An iterable of batches that feeds each batch to a `RowDigest` as it passes."""

    def __init__(self, batches: Iterable[Mapping[str, Any]], digest: RowDigest):
        self.batches, self.digest = batches, digest

    def __iter__(self) -> Iterator[Mapping[str, Any]]:
        for batch in self.batches:
            if isinstance(batch, Mapping) and torch.is_tensor(batch.get("input_ids")):
                self.digest.update(batch)
            yield batch


class _DigestedSized(_Digested):
    """A `_Digested` over batches of known number."""

    def __len__(self) -> int:
        return len(self.batches)


def digest_rows(batches: Iterable[Mapping[str, Any]], seed: Optional[int], cutoff_len: Optional[int]) -> dict:
    """The calibration record of `batches` (iterates them once)."""
    digest = RowDigest()
    for _ in digest.wrap(batches):
        pass
    return digest.record(seed, cutoff_len)


_DESCRIPTIONS = {"rows": "number of rows", "rows_sha256": "rows (token ids and labels)", "seed": "seed",
                 "cutoff_len": "cut-off length"}


def check_calibration_record(saved: Mapping[str, str], expected: Mapping[str, str], path: Path) -> None:
    """Raise `StatisticsMismatchError` naming what changed unless the cache was computed on the expected rows."""
    if "rows_sha256" in expected and "rows_sha256" not in saved:
        raise StatisticsMismatchError(
            f"the statistics cache {path} has no record of its calibration rows (written by an older tlora), so it "
            "cannot be checked against the rows given now; delete it to recalibrate"
        )
    changes = [
        f"{_DESCRIPTIONS[key]}: {saved.get(key, 'not recorded')} in the cache, {value} now"
        for key, value in expected.items()
        if saved.get(key) != value
    ]
    if changes:
        raise StatisticsMismatchError(
            f"the statistics cache {path} was computed on other calibration data ({'; '.join(changes)}); delete "
            "it or give another statistics_cache path to recalibrate"
        )


def check_statistics_settings(statistics: TLoRAStatistics, config: TLoRAConfig, path: Path) -> None:
    """Raise `StatisticsMismatchError` naming what differs unless the cache was computed with `config`'s sensitivity
    mode and statistics dtype."""
    settings = (("sensitivity", statistics.sensitivity_mode, config.sensitivity),
                ("statistics_dtype", statistics.dtype, config.statistics_dtype))
    changes = [f"{name}: {saved!r} in the cache, {now!r} now" for name, saved, now in settings if saved != now]
    if changes:
        raise StatisticsMismatchError(
            f"the statistics cache {path} was computed with other settings ({'; '.join(changes)}); delete it or give "
            "another statistics_cache path to recalibrate"
        )


def check_cache_writable(cache: Path) -> None:
    """Raise `CalibrationError` unless a file can be written at `cache` (checked before the calibration pass)."""
    if cache.exists() and not cache.is_file():
        raise CalibrationError(
            f"the statistics cache {cache} is a folder, not a file; give a file path ending in .safetensors"
        )
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cache.parent, prefix=f".{cache.name}.", suffix=".probe"):
            pass
    except OSError as error:
        raise CalibrationError(
            f"the statistics cache {cache} cannot be written: its folder {cache.parent} is not writable "
            f"({error.strerror or error}); give a statistics_cache path in a writable folder, or make it writable, "
            "before the calibration pass"
        ) from error


def _load_checked(
    cache: Path, calibration_data: Optional[Iterable], targets: list[TargetModule], config: TLoRAConfig,
    seed: Optional[int], cutoff_len: Optional[int],
) -> TLoRAStatistics:
    """The cache's statistics, checked against this model's targets, the config and the calibration rows (if given)."""
    rank, _ = distributed.rank_and_world_size()
    if not cache.is_file():
        raise FileNotFoundError(
            f"rank 0 uses the statistics cache {cache} but rank {rank} has no such file (a filesystem that is not "
            "shared?); put the cache where every rank sees it, copy it to every node, or delete it to recalibrate"
        )
    statistics = TLoRAStatistics.load(cache, require_digest=True)
    check_statistics_settings(statistics, config, cache)
    if calibration_data is not None:
        expected = digest_rows(calibration_data, seed, cutoff_len)
    else:
        expected = {k: str(v) for k, v in (("seed", seed), ("cutoff_len", cutoff_len)) if v is not None}
        logger.warning("No calibration_data given: the rows behind the statistics cache %s are not checked.", cache)
    check_calibration_record(statistics.calibration, expected, cache)
    try:
        statistics.check_matches(targets)
    except StatisticsMismatchError as error:
        raise StatisticsMismatchError(
            f"the statistics cache {cache} does not fit this model: {error}; delete it to recalibrate"
        ) from error
    return statistics


def cached_statistics(
    model: nn.Module,
    calibration_data: Optional[Iterable[Mapping[str, torch.Tensor]]],
    config: TLoRAConfig,
    targets: list[TargetModule],
    cache: str | Path,
    *,
    seed: Optional[int] = None,
    cutoff_len: Optional[int] = None,
    show_progress: bool = True,
) -> TLoRAStatistics:
    """Statistics from `cache` when rank 0 has that file (checked against the rows), else from a calibration pass
    over `calibration_data` whose result rank 0 writes to `cache` with the record of its rows."""
    cache = Path(cache)
    if distributed.broadcast_json(cache.is_file(), src=0):
        statistics, failure = None, None
        try:
            statistics = _load_checked(cache, calibration_data, targets, config, seed, cutoff_len)
        except Exception as error:  # agreed on, so that every rank raises it rather than waiting for the others
            failure = error
        distributed.raise_if_any_rank_failed(failure)
        logger.info("Loaded TLoRA statistics from %s; skipping the calibration pass.", cache)
        return statistics
    if calibration_data is None:
        raise CalibrationError(f"no statistics cache at {cache} yet; get_tlora_model needs calibration_data to make it")
    failure = None
    try:
        if distributed.rank_and_world_size()[0] == 0:  # the rank that writes the cache
            check_cache_writable(cache)
    except Exception as error:  # agreed on, so that no rank starts a pass whose result cannot be saved
        failure = error
    distributed.raise_if_any_rank_failed(failure)
    digest = RowDigest()
    statistics = compute_statistics(
        model, digest.wrap(calibration_data), config, targets=targets, show_progress=show_progress
    )
    statistics.calibration = digest.record(seed, cutoff_len)
    if distributed.rank_and_world_size()[0] == 0:
        statistics.save(cache)
    return statistics
