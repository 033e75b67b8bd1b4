"""Step 1 of TLoRA: the calibration pass, that collects, for every target module, the covariance of its inputs and
its sensitivity.

For each calibration sample s and target module l with weight W (m x n, out x in):

* covariance  C_l = sum_s Xc_s^T Xc_s, where Xc_s are the module's inputs at the sample's non-padding positions,
  centred by the sample's own mean. Modules that read the very same tensor (q/k/v; gate/up) share one C. A module
  that reads a tensor of its own and has m < n accumulates M_l = W C_l = sum_s (Xc_s W^T)^T Xc_s directly, which is
  smaller than C_l (Llama's down_proj).
* sensitivity S_l = (1/N) sum_s mean_ij |W_ij * (d loss_s / dW)_ij| with loss_s the sample's mean token loss.

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

from . import distributed
from .batch_checks import BatchRules, validate_batch
from .calibration_statistics import ModuleStatistics, TLoRAStatistics
from .config import TLoRAConfig
from .errors import CalibrationError, NonFiniteCalibrationError
from .hooks import BatchState, CalibrationHooks, Layout, StatisticSums
from .losses import losses_to_differentiate
from .targets import TargetModule, check_readable_weights, find_target_modules
from .weights import differentiable_quantized_layers

logger = logging.getLogger(__name__)


def compute_statistics(
    model: nn.Module,
    calibration_data: Iterable[Mapping[str, torch.Tensor]],
    config: Optional[TLoRAConfig] = None,
    *,
    targets: Optional[list[TargetModule]] = None,
    show_progress: bool = True,
    shard_batches: bool = True,
) -> TLoRAStatistics:
    """Run the calibration pass over `calibration_data` and return covariances and sensitivities.

    `calibration_data` is any iterable of batches (dicts with input_ids, attention_mask and labels). Under
    `torch.distributed` each rank processes the batches whose index modulo the world size is its rank (set
    `shard_batches=False` if each rank already iterates its own shard), and the sums are all-reduced so every rank
    returns identical statistics. The model's `requires_grad` flags and training mode are restored afterwards.
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
            hooks = CalibrationHooks(targets, layout, sums, config.sensitivity)
            with hooks.attached(), _progress(show_progress and run.rank == 0, _length(calibration_data)) as progress:
                for batch_index, batch in enumerate(batches):
                    _calibrate_batch(model, batch, batch_index, hooks, run, config)
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
    loss_scale: float = 1.0  # the differentiated losses are multiplied by it (float16 models; see _unscale)
    rules: BatchRules = field(default_factory=BatchRules)  # what every batch is checked against


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
# Layout probe: which targets read the same tensor
# ---------------------------------------------------------------------------------------------------------------


def _probe_inputs(inputs: dict) -> dict:
    """The first sample's first 16 positions of `inputs`, without labels."""
    probe = {}
    for key, value in inputs.items():
        if torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == inputs["input_ids"].shape[0]:
            value = value[:1]
            if value.dim() >= 2 and value.shape[1] == inputs["input_ids"].shape[1]:
                value = value[:, :16]
        probe[key] = value
    probe.pop("labels", None)
    return probe


def _record_target_inputs(
    model: nn.Module, targets: list[TargetModule], probe: dict
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """One no-grad forward: each target's first input tensor (in call order) and how often it was called."""
    seen: dict[str, Any] = {}
    calls: dict[str, int] = {}

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            seen.setdefault(name, args[0])
            calls[name] = calls.get(name, 0) + 1

        return hook

    handles = [target.module.register_forward_pre_hook(make_hook(target.name)) for target in targets]
    try:
        with torch.no_grad():
            model(**probe)
    finally:
        for handle in handles:
            handle.remove()
    return seen, calls


def _check_probe(targets: list[TargetModule], seen: dict[str, torch.Tensor], calls: dict[str, int]) -> None:
    """Raise `CalibrationError` for targets never called, fed one vector per sample, or called repeatedly."""
    never = [t.name for t in targets if t.name not in seen]
    if never:
        raise CalibrationError(
            f"target modules never called in a forward pass: {never[:6]}; remove them from target_modules"
        )
    flat = [n for n, tensor in seen.items() if tensor.dim() != 3]
    if flat:
        raise CalibrationError(
            f"target modules {flat[:4]} see one vector per sample (input shape "
            f"{tuple(seen[flat[0]].shape)}), but TLoRA's covariance is taken over the positions of each sample; "
            f"exclude them, e.g. exclude_modules={[n.split('.', 1)[-1] if '.' in n else n for n in flat[:2]]}"
        )
    repeated = [n for n, c in calls.items() if c > 1]
    if repeated:
        raise CalibrationError(
            f"target modules called more than once per forward pass (shared weights): {repeated[:6]}; "
            "TLoRA supports modules applied once per forward"
        )


def _choose_layout(targets: list[TargetModule], seen: dict[str, torch.Tensor]) -> Layout:
    """Readers of one tensor share one covariance; a lone reader with m < n stores W C ("cross") instead."""
    layout: Layout = {}
    leader_of_tensor: dict[int, str] = {}
    readers: dict[str, list[str]] = {}
    order = sorted(targets, key=lambda t: list(seen).index(t.name))
    for target in order:
        tensor_id = id(seen[target.name])
        leader = leader_of_tensor.setdefault(tensor_id, target.name)
        readers.setdefault(leader, []).append(target.name)
    for leader, names in readers.items():
        for name in names:
            target = next(t for t in targets if t.name == name)
            if len(names) == 1 and target.out_features < target.in_features:
                layout[name] = ("cross", name)
            else:
                layout[name] = ("covariance", leader)
    return layout


def probe_layout(model: nn.Module, targets: list[TargetModule], inputs: dict) -> Layout:
    """Find which targets read the same tensor (one short no-grad forward) and choose each module's layout."""
    seen, calls = _record_target_inputs(model, targets, _probe_inputs(inputs))
    _check_probe(targets, seen, calls)
    return _choose_layout(targets, seen)


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


def _skip_model_loss(model: nn.Module, run: _PassRun, batch_size: int, config: TLoRAConfig) -> bool:
    """Once the per-sample split of the loss is verified, the model need not compute its own loss as well."""
    return (
        run.loss_kind is not None and not run.sample_by_sample and batch_size > 1 and config.sensitivity == "per_sample"
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
        state.collect_sensitivity = not run.sample_by_sample
        outputs = model(**forward_inputs)
        if not skip_model_loss and getattr(outputs, "loss", None) is None:
            raise CalibrationError(
                f"the model returned no loss for calibration batch {state.batch_index} although it has labels"
            )
        split = losses_to_differentiate(outputs, inputs, model, config.sensitivity, run.loss_kind, run.sample_by_sample)
        run.loss_kind, run.sample_by_sample, valid = split.kind, split.sample_by_sample, split.valid
        if run.sample_by_sample:
            state.saved_inputs.clear()
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
    batch_size = valid.shape[0]
    state.collect_covariance = False
    state.collect_sensitivity = True
    totals: dict[str, torch.Tensor] = {}
    for sample in range(batch_size):
        if not bool(valid[sample]):
            continue
        single = {
            key: value[sample : sample + 1] if torch.is_tensor(value) and value.dim() >= 1 else value
            for key, value in inputs.items()
        }
        with state.single_sample(sample):
            state.calls.clear()
            state.per_sample_sensitivity = {}
            with torch.enable_grad():
                outputs = model(**single)
                (outputs.loss * loss_scale).backward()
        for name, values in state.per_sample_sensitivity.items():
            totals.setdefault(name, torch.zeros(batch_size, dtype=torch.float64, device=values.device))
            totals[name][sample] = values[0]
    state.per_sample_sensitivity = totals


# ---------------------------------------------------------------------------------------------------------------
# Loss scaling (float16 models)
# ---------------------------------------------------------------------------------------------------------------

FP16_INITIAL_LOSS_SCALE = 2.0**16  # as torch.amp.GradScaler's default
LOSS_SCALE_BACKOFF = 2.0**4  # the scale is divided by this on an overflow and the batch's backward pass redone


def initial_loss_scale(model: nn.Module) -> float:
    """The loss scale the calibration backward pass starts with: FP16_INITIAL_LOSS_SCALE for float16 models, else 1."""
    if not any(parameter.dtype == torch.float16 for parameter in model.parameters()):
        return 1.0
    logger.info(
        "float16 model: the TLoRA calibration backward pass multiplies each loss by a loss scale (starting at %g, "
        "divided by %g on an overflow) and divides |W * G| by it, so that small gradients do not underflow.",
        FP16_INITIAL_LOSS_SCALE,
        LOSS_SCALE_BACKOFF,
    )
    return FP16_INITIAL_LOSS_SCALE


def _gradients_finite(state: BatchState) -> bool:
    """Whether every per-sample sensitivity of the batch is finite (one device sync)."""
    flags = [flag.all() for _, flag in state.gradient_flags]
    return not flags or bool(torch.stack([f.to(flags[0].device) for f in flags]).all().item())


def _unscale(
    model: nn.Module, inputs: dict, state: BatchState, valid: torch.Tensor, run: _PassRun, config: TLoRAConfig
) -> None:
    """Divide the batch's sensitivities by the loss scale; while the scaled gradients overflow, lower the scale and
    redo the batch's backward pass (sensitivity only: the covariance is already accumulated)."""
    while run.loss_scale > 1.0 and not _gradients_finite(state):
        run.loss_scale = max(1.0, run.loss_scale / LOSS_SCALE_BACKOFF)
        logger.info("TLoRA calibration: gradients overflowed in batch %d; loss scale lowered to %g and the batch's "
                    "backward pass redone.", state.batch_index, run.loss_scale)
        state.calls.clear()
        state.saved_inputs.clear()
        state.per_sample_sensitivity, state.gradient_flags, state.input_flags = {}, [], []
        state.collect_covariance = False
        if run.sample_by_sample:
            _per_sample_passes(model, inputs, state, valid, run.loss_scale)
        else:
            _batched_pass(model, inputs, state, run, config)
    if run.loss_scale != 1.0:
        for values in state.per_sample_sensitivity.values():
            values.div_(run.loss_scale)


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
    sums: StatisticSums, targets: list[TargetModule], layout: Layout, counts: torch.Tensor, sensitivity: torch.Tensor
) -> None:
    """Sum the counts, sensitivities and covariances over all ranks, in place."""
    # Every rank must own a buffer for every statistic, even if it processed no batch.
    sums.ensure_all(targets, layout)
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
        _all_reduce(sums, targets, layout, counts, sensitivity)
    num_samples, num_tokens, num_sensitivity_samples = (int(round(v)) for v in counts.tolist())
    if num_sensitivity_samples == 0:
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
