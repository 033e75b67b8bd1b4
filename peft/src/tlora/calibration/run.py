"""Step 1 of TLoRA: the calibration pass, that collects, for every target module, the covariance of its inputs and
its sensitivity.

For each calibration sample s and target module l with weight W (m x n, out x in):

* covariance  C_l = sum_s Xc_s^T Xc_s, where Xc_s are the module's inputs at the sample's non-padding positions,
  centred by the sample's own mean. Modules that read the very same tensor (q/k/v; gate/up) share one C. A module
  that reads a tensor of its own and has m < n accumulates M_l = W C_l = sum_s (Xc_s W^T)^T Xc_s directly, which is
  smaller than C_l (Llama's down_proj).
* sensitivity S_l = (1/N) sum_s mean_ij |W_ij * (d loss_s / dW)_ij| with loss_s the sample's mean token loss
  (defined, with its modes, loss split, float16 loss scale and normalisation, in sensitivity.py).

Per-sample weight gradients are formed inside one batched pass: the backward pass computes activation gradients
only (no parameter requires grad), and each target module turns the gradient of its output, delta_s, and its saved
input X_s into dl_s/dW = delta_s^T X_s one sample at a time, consumes it and frees it. No `.grad` is ever written.
"""
from __future__ import annotations

import inspect
import itertools
import logging
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from .. import distributed
from ..config import PER_SAMPLE, TLoRAConfig
from ..errors import CalibrationError, NonFiniteCalibrationError
from ..targets import TargetModule, check_readable_weights, find_target_modules
from ..weights import differentiable_quantized_layers
from .batch_checks import BatchRules, validate_batch
from .batch_state import BatchState
from .hooks import CalibrationHooks, ForwardComplete, StatisticSums
from .layout import Layout, probe_layout, statistic_groups
from .sensitivity import initial_loss_scale, losses_to_differentiate, unscale
from .statistics import ModuleStatistics, TLoRAStatistics

logger = logging.getLogger(__name__)


def compute_statistics(
    model: nn.Module,
    calibration_data: Iterable[Mapping[str, torch.Tensor]],
    config: Optional[TLoRAConfig] = None,
    *,
    targets: Optional[list[TargetModule]] = None,
    show_progress: bool = True,
    shard_batches: bool = True,
    share: Optional["PassShare"] = None,
) -> TLoRAStatistics:
    """Run the calibration pass over `calibration_data` and return covariances and sensitivities.

    `calibration_data` is any iterable of batches (dicts with input_ids, attention_mask and labels). Under
    `torch.distributed` each rank processes the batches whose index modulo the world size is its rank (set
    `shard_batches=False` if each rank already iterates its own shard), and the sums are all-reduced so every rank
    returns identical statistics. The model's `requires_grad` flags and training mode are restored afterwards.

    `share` makes this one pass of `statistics_passes`: it collects only its group of the statistics, and, unless it
    is the pass that measures the sensitivities, runs forward-only and stops each forward after its last module.
    """
    config = config or TLoRAConfig()
    targets = targets if targets is not None else find_target_modules(model, config)
    check_readable_weights(targets)
    check_same_base_weights(targets)
    sums = StatisticSums(getattr(torch, config.statistics_dtype), resolve_statistics_device(config))
    run = _PassRun(_model_input_device(model), _forward_keys(model), *_shard(shard_batches))
    run.loss_scale = initial_loss_scale(model)
    run.rules = BatchRules.for_model(model, config.task_type)
    failure = None
    try:
        first, batches = _first_batch(calibration_data, run.rules)
        with _frozen(model), differentiable_quantized_layers((t.module, t.storage) for t in targets):
            layout = probe_layout(model, targets, _prepare_inputs(first, run.device, run.keys))
            run.only = statistic_groups(targets, layout, share.count)[share.index] if share else None
            run.sensitivity = share is None or share.sensitivity
            hooks = CalibrationHooks(targets, layout, sums, config.sensitivity, run.only, not run.sensitivity)
            calibrate = _calibrate_batch if run.sensitivity else _forward_only_batch
            with hooks.attached(), _progress(show_progress and run.rank == 0, _length(calibration_data)) as progress:
                for batch_index, batch in enumerate(batches):
                    calibrate(model, batch, batch_index, hooks, run, config)
                    if progress is not None:
                        progress.update(1)
    except Exception as error:  # agreed on below, so that no other rank is left waiting in the all-reduce
        failure = error
    distributed.raise_if_any_rank_failed(failure)
    _warn_unlabelled(run.skipped)
    return _finalise(sums, targets, layout, run, config)


# ---------------------------------------------------------------------------------------------------------------
# Setup: the data, the model, the progress bar
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _PassRun:
    """Where the pass stands: the model's input device and keywords, this rank's share, the running counts."""

    device: torch.device
    keys: Optional[set]
    rank: int
    world_size: int
    num_samples: int = 0
    num_tokens: int = 0
    num_sensitivity_samples: int = 0
    sample_offset: int = 0
    loss_kind: Optional[str] = None  # the per-sample split of the loss, once verified
    sample_by_sample: bool = False  # no split applies: one pass per sample
    skipped: list = field(default_factory=list)  # samples without a label token
    loss_scale: float = 1.0  # the differentiated losses are multiplied by it (float16 models; sensitivity.py)
    rules: BatchRules = field(default_factory=BatchRules)  # what every batch is checked against
    only: Optional[frozenset] = None  # the statistic keys this pass collects (None: all; statistics_passes)
    sensitivity: bool = True  # False: a forward-only pass of statistics_passes


@dataclass(frozen=True)
class PassShare:
    """One pass of `statistics_passes`: it collects group `index` of `count` (layout.statistic_groups); the pass
    with `sensitivity` also runs the backward pass that measures every module's sensitivity."""

    index: int
    count: int
    sensitivity: bool


def check_same_base_weights(targets: list[TargetModule]) -> None:
    """Under `torch.distributed`, raise `CalibrationError` on every rank unless all ranks hold the same target weights
    (compared through their fingerprints), naming the ranks and modules that differ."""
    if not distributed.is_distributed():
        return
    fingerprints = distributed.run_agreed(lambda: {target.name: target.fingerprint() for target in targets})
    differences = distributed.differences_from_rank_0(fingerprints)
    if not differences:
        return
    described = "; ".join(
        f"rank {rank} holds other weights than rank 0 for {', '.join(names[:5])}"
        f"{f' and {len(names) - 5} more' if len(names) > 5 else ''} ({len(names)} of {len(targets)} target modules)"
        for rank, names in differences.items()
    )
    raise CalibrationError(
        f"the base weights differ between ranks: {described}. Every rank must load the same base model: check the "
        "checkpoint path, revision, dtype and quantisation on every node, and change no weight before TLoRA calibrates"
    )


def resolve_statistics_device(config: TLoRAConfig) -> Optional[torch.device]:
    """The device the sums are kept on (None: each module's own)."""
    return torch.device(config.statistics_device) if config.statistics_device else None


def _shard(shard_batches: bool) -> tuple[int, int]:
    """(rank, world size) for sharding the batches; (0, 1) when each rank iterates its own shard."""
    rank, world_size = distributed.rank_and_world_size()
    return (rank, world_size) if shard_batches else (0, 1)


def _length(calibration_data: Iterable) -> Optional[int]:
    """The number of batches, if known."""
    return len(calibration_data) if hasattr(calibration_data, "__len__") else None


def _first_batch(
    calibration_data: Iterable[Mapping[str, Any]], rules: BatchRules
) -> tuple[Mapping[str, Any], Iterator]:
    """The validated first batch, and an iterator over all batches (the first included)."""
    iterator = iter(calibration_data)
    first = next(iterator, None)
    if first is None:
        raise CalibrationError("calibration_data yielded no batches; TLoRA needs a few hundred training samples")
    validate_batch(first, 0, rules)
    return first, itertools.chain([first], iterator)


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Within the block the model is in eval mode with no parameter requiring grad; both are restored on exit."""
    was_training = model.training
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        model.eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        yield
    finally:
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(requires_grad.get(name, parameter.requires_grad))
        model.train(was_training)


@contextmanager
def _progress(show: bool, total: Optional[int]) -> Iterator[Any]:
    """A tqdm bar over the batches, or None."""
    if not show:
        yield None
        return
    from tqdm.auto import tqdm

    progress = tqdm(total=total, desc="TLoRA calibration", unit="batch")
    try:
        yield progress
    finally:
        progress.close()


def _batch_size(batch: Mapping[str, Any]) -> int:
    """The number of samples in a batch."""
    return int(batch["input_ids"].shape[0])


def _model_input_device(model: nn.Module) -> torch.device:
    """The device of the input embeddings (where batches go)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        return embeddings.weight.device
    return next(model.parameters()).device


def _forward_keys(model: nn.Module) -> Optional[set]:
    """Names `model.forward` accepts, or None if it takes arbitrary keywords only."""
    parameters = inspect.signature(model.forward).parameters
    named = {n for n, p in parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return named or None


def _prepare_inputs(batch: Mapping[str, Any], device: torch.device, keys: Optional[set]) -> dict:
    """The batch's forward arguments on `device`, with an attention mask and without the KV cache."""
    prepared = {}
    for key, value in batch.items():
        if keys is not None and key not in keys:
            continue
        prepared[key] = value.to(device) if torch.is_tensor(value) else value
    if "attention_mask" not in prepared or prepared["attention_mask"] is None:
        prepared["attention_mask"] = torch.ones_like(prepared["input_ids"])
    if keys is None or "use_cache" in keys:
        prepared["use_cache"] = False
    return prepared


# ---------------------------------------------------------------------------------------------------------------
# Finiteness checks
# ---------------------------------------------------------------------------------------------------------------


def _raise_non_finite(flags: list, state: BatchState, what: str) -> None:
    """Raise `NonFiniteCalibrationError` for the first module (in execution order) and sample flagged."""
    for name, flag in flags:
        bad = (~flag).nonzero().flatten()
        if bad.numel():
            row = int(bad[0])
            raise NonFiniteCalibrationError(
                f"non-finite value (NaN or Inf) in the {what} of module '{name}' for calibration sample "
                f"{state.sample_offset + row} (batch {state.batch_index}, row {row})"
            )


def _check_flags(flags: list, state: BatchState, what: str, extra: Optional[torch.Tensor] = None) -> None:
    """One device sync per check: raise for the first module (in execution order) and sample that went bad."""
    tensors = [flag for _, flag in flags] + ([extra] if extra is not None else [])
    if not tensors:
        return
    device = tensors[0].device
    if bool(torch.stack([t.all().to(device) for t in tensors]).all().item()):
        return
    _raise_non_finite(flags, state, what)
    bad = int((~extra).nonzero().flatten()[0].item())
    raise NonFiniteCalibrationError(
        f"non-finite loss for calibration sample {state.sample_offset + bad} (batch {state.batch_index}, "
        f"row {bad}) although every target input was finite"
    )


# ---------------------------------------------------------------------------------------------------------------
# One batch
# ---------------------------------------------------------------------------------------------------------------


def _calibrate_batch(
    model: nn.Module, batch: Mapping[str, Any], batch_index: int, hooks: CalibrationHooks, run: _PassRun,
    config: TLoRAConfig,
) -> None:
    """Accumulate one batch into the sums (or only count its samples when it belongs to another rank)."""
    validate_batch(batch, batch_index, run.rules)
    batch_size = _batch_size(batch)
    if batch_index % run.world_size != run.rank:
        run.sample_offset += batch_size
        return
    inputs = _prepare_inputs(batch, run.device, run.keys)
    state = BatchState.for_batch(inputs["attention_mask"], batch_index, run.sample_offset)
    hooks.state = state
    valid = _batched_pass(model, inputs, state, run, config)
    if run.sample_by_sample:
        _per_sample_passes(model, inputs, state, valid, run.loss_scale)
    _unscale(model, inputs, state, valid, run, config)
    _check_flags(state.gradient_flags, state, "output gradient")
    _record_batch(hooks, state, valid, run, batch_size)
    hooks.state = None


def _forward_only_batch(
    model: nn.Module, batch: Mapping[str, Any], batch_index: int, hooks: CalibrationHooks, run: _PassRun,
    config: TLoRAConfig,
) -> None:
    """Accumulate one batch's share of the statistics with a forward pass cut after its last module."""
    validate_batch(batch, batch_index, run.rules)
    batch_size = _batch_size(batch)
    if batch_index % run.world_size != run.rank or not run.only:
        run.sample_offset += batch_size
        return
    inputs = {k: v for k, v in _prepare_inputs(batch, run.device, run.keys).items() if k != "labels"}
    state = BatchState.for_batch(inputs["attention_mask"], batch_index, run.sample_offset)
    state.collect(sensitivity=False)
    hooks.state = state
    try:
        with torch.no_grad():
            model(**inputs)
    except ForwardComplete:
        pass
    _check_flags(state.input_flags, state, "input")
    run.num_samples += batch_size
    run.num_tokens += int(state.counts.sum().item())
    run.sample_offset += batch_size
    hooks.state = None


def _skip_model_loss(model: nn.Module, run: _PassRun, batch_size: int, config: TLoRAConfig) -> bool:
    """Once the per-sample split of the loss is verified, the model need not compute its own loss as well."""
    return (
        run.loss_kind is not None and not run.sample_by_sample and batch_size > 1 and config.sensitivity == PER_SAMPLE
        and not getattr(getattr(model, "config", None), "is_encoder_decoder", False)
    )


def _batched_pass(
    model: nn.Module, inputs: dict, state: BatchState, run: _PassRun, config: TLoRAConfig
) -> torch.Tensor:
    """One forward and (unless the loss cannot be split) one backward pass over the batch; returns which samples
    count towards the sensitivity."""
    skip_model_loss = _skip_model_loss(model, run, state.mask.shape[0], config)
    forward_inputs = {k: v for k, v in inputs.items() if k != "labels"} if skip_model_loss else inputs
    with torch.enable_grad():
        state.collect(sensitivity=not run.sample_by_sample)
        outputs = model(**forward_inputs)
        if not skip_model_loss and getattr(outputs, "loss", None) is None:
            raise CalibrationError(
                f"the model returned no loss for calibration batch {state.batch_index} although it has labels"
            )
        split = losses_to_differentiate(outputs, inputs, model, config.sensitivity, run.loss_kind, run.sample_by_sample)
        run.loss_kind, run.sample_by_sample, valid = split.kind, split.sample_by_sample, split.valid
        if run.sample_by_sample:
            state.drop_saved_inputs()
        _check_flags(state.input_flags, state, "input", torch.isfinite(split.losses) | ~valid)
        if split.total is not None:
            (split.total * run.loss_scale).backward()
        del outputs, split
    return valid


def _per_sample_passes(
    model: nn.Module, inputs: dict, state: BatchState, valid: torch.Tensor, loss_scale: float = 1.0
) -> None:
    """Fallback for losses that cannot be split: one forward and backward pass per labelled sample (the covariance
    was already collected by the batched pass)."""
    state.collect(covariance=False, sensitivity=True)
    for sample in range(valid.shape[0]):
        if not bool(valid[sample]):
            continue
        single = {
            key: value[sample : sample + 1] if torch.is_tensor(value) and value.dim() >= 1 else value
            for key, value in inputs.items()
        }
        with state.sample_pass(sample), torch.enable_grad():
            outputs = model(**single)
            (outputs.loss * loss_scale).backward()


def _unscale(
    model: nn.Module, inputs: dict, state: BatchState, valid: torch.Tensor, run: _PassRun, config: TLoRAConfig
) -> None:
    """Undo the loss scale of the batch's sensitivities, redoing its backward pass while they overflow."""

    def redo_backward(scale: float) -> None:
        run.loss_scale = scale
        if run.sample_by_sample:
            _per_sample_passes(model, inputs, state, valid, run.loss_scale)
        else:
            _batched_pass(model, inputs, state, run, config)

    run.loss_scale = unscale(state, run.loss_scale, redo_backward)


def _record_batch(hooks: CalibrationHooks, state: BatchState, valid: torch.Tensor, run: _PassRun, batch_size: int):
    """Add the batch's sensitivities (labelled samples only) and counts to the running totals."""
    valid_count = int(valid.sum().item())
    if valid_count < batch_size:
        rows = (~valid).nonzero().flatten().tolist()
        run.skipped.extend(run.sample_offset + row for row in rows)
    hooks.sums.add_sensitivities(state.per_sample_sensitivity, valid.to(torch.float64))
    run.num_samples += batch_size
    run.num_tokens += int(state.counts.sum().item())
    run.num_sensitivity_samples += valid_count
    run.sample_offset += batch_size


# ---------------------------------------------------------------------------------------------------------------
# Finalise
# ---------------------------------------------------------------------------------------------------------------


def _warn_unlabelled(skipped: list[int]) -> None:
    """Log the calibration samples that had no label token."""
    if skipped:
        logger.warning(
            "%d calibration samples have no label tokens (e.g. the response was cut off by cutoff_len) and do not "
            "count towards the sensitivity: %s",
            len(skipped),
            skipped[:20],
        )


def _all_reduce(
    sums: StatisticSums, targets: list[TargetModule], layout: Layout, counts: torch.Tensor, sensitivity: torch.Tensor,
    only: Optional[frozenset] = None,
) -> None:
    """Sum the counts, sensitivities and covariances over all ranks, in place."""
    # Every rank must own a buffer for every statistic, even if it processed no batch.
    sums.ensure_all(targets, layout, only)
    distributed.all_reduce_sum_(
        [counts, sensitivity]
        + [sums.covariances[k] for k in sorted(sums.covariances)]
        + [sums.cross[k] for k in sorted(sums.cross)]
    )


def _module_records(targets: list[TargetModule], layout: Layout, sensitivity: torch.Tensor) -> list[ModuleStatistics]:
    """One record per target: shape, layout, sensitivity sum and weight fingerprint."""
    records = []
    for target, total in zip(targets, sensitivity.tolist()):
        kind, key = layout[target.name]
        records.append(
            ModuleStatistics(
                name=target.name,
                kind=target.kind,
                out_features=target.out_features,
                in_features=target.in_features,
                layout=kind,
                covariance_key=key,
                sensitivity_sum=float(total),
                fingerprint=target.fingerprint(),
            )
        )
    return records


def _finalise(
    sums: StatisticSums, targets: list[TargetModule], layout: Layout, run: _PassRun, config: TLoRAConfig
) -> TLoRAStatistics:
    """All-reduce the sums across ranks and package them."""
    sums.complete_covariances()
    for target in targets:
        if target.name not in sums.sensitivity_sums:
            sums.sensitivity_sums[target.name] = torch.zeros((), dtype=torch.float64)
    counts = torch.tensor([run.num_samples, run.num_tokens, run.num_sensitivity_samples], dtype=torch.float64)
    sensitivity = torch.stack([sums.sensitivity_sums[t.name].double().cpu() for t in targets])
    if distributed.is_distributed():
        _all_reduce(sums, targets, layout, counts, sensitivity, run.only)
    num_samples, num_tokens, num_sensitivity_samples = (int(round(v)) for v in counts.tolist())
    if num_sensitivity_samples == 0 and run.sensitivity:
        raise CalibrationError("no calibration sample has a label token; the sensitivity is undefined")
    return TLoRAStatistics(
        modules=_module_records(targets, layout, sensitivity),
        covariances={k: sums.covariances[k] for k in sorted(sums.covariances)},
        cross_covariances={k: sums.cross[k] for k in sorted(sums.cross)},
        num_samples=num_samples,
        num_tokens=num_tokens,
        num_sensitivity_samples=num_sensitivity_samples,
        sensitivity_mode=config.sensitivity,
        dtype=config.statistics_dtype,
    )
