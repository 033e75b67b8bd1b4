"""The hooks of the calibration pass: forward hooks accumulate each target's input covariance C (or W C), gradient
hooks turn each target's output gradient into the per-sample sensitivity.

All state lives outside the model: `BatchState` describes the batch being processed (built in one place,
`BatchState.for_batch`), `StatisticSums` holds the running sums, and `CalibrationHooks` registers and removes the
hooks.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from .devices import BatchView, DeviceViews
from .errors import CalibrationError
from .targets import TargetModule

Layout = dict[str, tuple[str, str]]  # module name -> ("covariance", shared key) or ("cross", module name)


# ---------------------------------------------------------------------------------------------------------------
# The batch being processed
# ---------------------------------------------------------------------------------------------------------------


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


def centred_rows(tensor: torch.Tensor, state: BatchState, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`tensor` (batch, sequence, features) at valid positions, centred per sample, as rows in `dtype` (a new
    tensor); plus the per-sample sums used for the finiteness check. Relies on `state.flat_valid` being set
    whenever the batch has padding."""
    batch, length = state.mask.shape
    if tensor.dim() != 3 or tensor.shape[:2] != (batch, length):
        raise CalibrationError(
            f"a target module received inputs of shape {tuple(tensor.shape)}; TLoRA needs (batch, sequence, "
            f"features) matching attention_mask {tuple(state.mask.shape)}"
        )
    features = tensor.shape[-1]
    view = state.on(tensor.device)
    if view.flat_valid is not None:
        # Gather the valid rows first (in sample order), then centre each sample's run of rows.
        rows = tensor.detach().reshape(batch * length, features).index_select(0, view.flat_valid).to(dtype)
        sample_of_row = view.flat_valid // length
        sums = rows.new_zeros(batch, features).index_add_(0, sample_of_row, rows)
        means = sums / view.counts.clamp_min(1).unsqueeze(-1).to(dtype)
        rows.sub_(means.index_select(0, sample_of_row))
        return rows, sums
    rows = tensor.detach().to(dtype, copy=True)  # no padding: every row is valid
    sums = rows.sum(dim=1)
    rows.sub_((sums / max(length, 1)).unsqueeze(1))
    return rows.view(batch * length, features), sums


# ---------------------------------------------------------------------------------------------------------------
# The running sums
# ---------------------------------------------------------------------------------------------------------------


class StatisticSums:
    """Running sums over the calibration set: covariances C (by shared key), W C products, sensitivity sums."""

    def __init__(self, dtype: torch.dtype, statistics_device: Optional[torch.device]):
        self.dtype = dtype
        self.statistics_device = statistics_device
        self.covariances: dict[str, torch.Tensor] = {}
        self.cross: dict[str, torch.Tensor] = {}
        self.sensitivity_sums: dict[str, torch.Tensor] = {}

    def buffer(self, store: dict, key: str, shape: tuple, device: torch.device) -> torch.Tensor:
        """The sum `store[key]`, created as zeros on first use."""
        if key not in store:
            store[key] = torch.zeros(shape, dtype=self.dtype, device=self.statistics_device or device)
        return store[key]

    @staticmethod
    def add_product(buffer: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> None:
        """buffer += left^T @ right."""
        if buffer.device == left.device:
            buffer.addmm_(left.t(), right)
        else:
            buffer.add_((left.t() @ right).to(buffer.device))

    def add_gram(self, buffer: torch.Tensor, rows: torch.Tensor) -> None:
        """buffer += rows^T rows on the upper block triangle only (`complete_covariances` mirrors it): the
        products of a symmetric C cost about 5/8 of the full one."""
        edges = _gram_block_edges(rows.shape[1])
        for start, stop in zip(edges[:-1], edges[1:]):
            self.add_product(buffer[start:stop, start:], rows[:, start:stop], rows[:, start:])

    def complete_covariances(self) -> None:
        """Mirror the upper block triangle accumulated by `add_gram` into the lower one (idempotent)."""
        for covariance in self.covariances.values():
            edges = _gram_block_edges(covariance.shape[1])
            for start, stop in zip(edges[1:-1], edges[2:]):
                covariance[start:stop, :start].copy_(covariance[:start, start:stop].t())

    def add_sensitivities(self, per_sample: dict[str, torch.Tensor], weights: torch.Tensor) -> None:
        """sensitivity_sums[l] += sum_s weights_s g_{l,s}."""
        for name, values in per_sample.items():
            if name not in self.sensitivity_sums:
                self.sensitivity_sums[name] = torch.zeros((), dtype=torch.float64, device=values.device)
            self.sensitivity_sums[name] += (values * weights.to(values.device)).sum()

    def ensure_all(self, targets: list[TargetModule], layout: Layout) -> None:
        """Create zero sums for every statistic and module not seen yet (a rank that processed no batch)."""
        for target in targets:
            kind, key = layout[target.name]
            store = self.covariances if kind == "covariance" else self.cross
            if key not in store:
                device = self.statistics_device or target.module.weight.device
                store[key] = torch.zeros(target.statistic_shape(kind), dtype=self.dtype, device=device)


def _gram_block_edges(features: int) -> list[int]:
    """Column blocks of a Gram matrix accumulated by blocks (4 from 256 features up, else one)."""
    blocks = 4 if features >= 256 else 1
    return [features * block // blocks for block in range(blocks + 1)]


# ---------------------------------------------------------------------------------------------------------------
# The hooks
# ---------------------------------------------------------------------------------------------------------------


class CalibrationHooks:
    """Forward and gradient hooks that accumulate the statistics of the target modules into `sums`."""

    def __init__(self, targets: list[TargetModule], layout: Layout, sums: StatisticSums, sensitivity_mode: str):
        self.targets = {t.name: t for t in targets}
        self.layout = layout
        self.sums = sums
        self.sensitivity_mode = sensitivity_mode
        self.state: Optional[BatchState] = None
        self.handles: list = []

    @contextmanager
    def attached(self) -> Iterator["CalibrationHooks"]:
        """Within the block the hooks are registered; they are removed (and the batch state dropped) on exit."""
        try:
            for name, target in self.targets.items():
                self.handles.append(target.module.register_forward_pre_hook(self._pre_hook))
                self.handles.append(target.module.register_forward_hook(self._make_forward_hook(name)))
            yield self
        finally:
            for handle in self.handles:
                handle.remove()
            self.handles.clear()
            self.state = None

    def _pre_hook(self, module: nn.Module, args: tuple) -> None:
        """Make the target's input require grad, so that the backward pass reaches every target."""
        state = self.state
        if state is None or not state.collect_sensitivity or not torch.is_grad_enabled():
            return None
        inputs = args[0]
        # Nothing upstream requires grad (all parameters are frozen), so this tensor is a leaf: marking it
        # makes the rest of the network differentiable without any weight gradient being computed.
        if not inputs.requires_grad:
            inputs.requires_grad_(True)
        return None

    def _make_forward_hook(self, name: str) -> Callable:
        """The forward hook of target `name`."""

        def forward_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if self.state is not None:
                self._on_forward(name, args[0], output)
            return None

        return forward_hook

    def _make_gradient_hook(self, name: str) -> Callable:
        """The hook on the output of target `name` that receives its gradient."""

        def gradient_hook(grad_output: torch.Tensor) -> None:
            if self.state is not None:
                self._on_gradient(name, grad_output)
            return None

        return gradient_hook

    # ----- forward: covariance -----
    def _count_call(self, name: str) -> None:
        """Refuse a target applied more than once in one forward pass."""
        state = self.state
        state.calls[name] = state.calls.get(name, 0) + 1
        if state.calls[name] > 1:
            raise CalibrationError(
                f"target module {name} was called {state.calls[name]} times in one forward pass; TLoRA supports "
                "modules applied once per forward (no weight sharing across positions in the network)"
            )

    def _on_forward(self, name: str, inputs: torch.Tensor, output: torch.Tensor) -> None:
        """Accumulate the target's covariance and keep its input for the gradient hook."""
        state = self.state
        self._count_call(name)
        if state.collect_covariance:
            self._accumulate_covariance(name, inputs, output)
        if state.collect_sensitivity and torch.is_grad_enabled() and output.requires_grad:
            state.saved_inputs[name] = inputs
            output.register_hook(self._make_gradient_hook(name))

    def _accumulate_covariance(self, name: str, inputs: torch.Tensor, output: torch.Tensor) -> None:
        """C += Xc^T Xc for a module that leads its shared input, or W C += Zc^T Xc in the "cross" layout."""
        state = self.state
        layout, key = self.layout[name]
        if layout == "covariance" and key != name:
            if state.shared_inputs.get(key) is not inputs:
                raise CalibrationError(
                    f"{name} was expected to read the same input tensor as {key} (found on the first batch) "
                    "but did not; the statistics cannot be shared"
                )
            return
        rows, sums = centred_rows(inputs, state, self.sums.dtype)
        state.input_flags.append((name, torch.isfinite(sums.sum(dim=1))))
        if layout == "covariance":
            state.shared_inputs[name] = inputs
            buffer = self.sums.buffer(self.sums.covariances, key, (rows.shape[1],) * 2, rows.device)
            self.sums.add_gram(buffer, rows)
        else:
            self._accumulate_cross(name, rows, output)
        del rows

    def _accumulate_cross(self, name: str, rows: torch.Tensor, output: torch.Tensor) -> None:
        """M = W C = sum_s Zc_s^T Xc_s, with Zc the per-sample centred outputs without bias."""
        target = self.targets[name]
        if output.dtype == self.sums.dtype:
            outputs, _ = centred_rows(output, self.state, self.sums.dtype)  # the bias cancels in the centring
        else:
            outputs = rows @ target.weight_matrix(self.sums.dtype, copy=False).t()
        shape = (target.out_features, target.in_features)
        buffer = self.sums.buffer(self.sums.cross, name, shape, rows.device)
        self.sums.add_product(buffer, outputs, rows)
        del outputs

    # ----- backward: sensitivity -----
    def _gradient_dtype(self, inputs: torch.Tensor) -> torch.dtype:
        """Per-sample weight gradients are formed in the statistics dtype, except for half-precision models on an
        accelerator, where they are formed in the model's dtype as autograd's own weight gradients would be (the
        L1 reduction still accumulates in float32)."""
        if inputs.device.type != "cpu" and inputs.dtype in (torch.bfloat16, torch.float16):
            return inputs.dtype
        return self.sums.dtype

    def _on_gradient(self, name: str, grad_output: torch.Tensor) -> None:
        """g_{l,s} = mean_ij |W_ij (d loss_s / dW)_ij| for every sample s of the batch."""
        state = self.state
        inputs = state.saved_inputs.pop(name, None)
        if inputs is None:
            return
        target = self.targets[name]
        weight = _stored_weight(target, self._gradient_dtype(inputs))
        values = torch.zeros(grad_output.shape[0], dtype=torch.float64, device=grad_output.device)
        if self.sensitivity_mode == "per_sample":
            self._fill_per_sample_sensitivity(values, target, weight, inputs, grad_output)
        else:
            self._fill_batch_sensitivity(values, target, weight, inputs, grad_output)
        # A NaN or Inf in the output gradient (or the saved input) propagates into these values.
        state.gradient_flags.append((name, torch.isfinite(values)))
        state.per_sample_sensitivity[name] = values

    def _fill_per_sample_sensitivity(
        self, values: torch.Tensor, target: TargetModule, weight: torch.Tensor, inputs: torch.Tensor,
        grad_output: torch.Tensor,
    ) -> None:
        """values_s = sample s's sensitivity from its own gradient dl_s/dW = delta_s^T X_s, formed in turn in one
        reused buffer."""
        positions = self.state.on(grad_output.device).positions
        input_positions = self.state.on(inputs.device).positions
        gradient = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
        for sample, where in enumerate(positions):
            delta = grad_output[sample, where].to(weight.dtype)
            if delta.shape[0] == 0:
                continue
            inputs_s = inputs[sample, input_positions[sample]].detach().to(device=weight.device, dtype=weight.dtype)
            # dl_s/dW for this sample only, in the weight's own layout, consumed at once.
            left, right = (delta, inputs_s) if target.kind == "linear" else (inputs_s, delta)
            values[sample] = _mean_weighted_l1(torch.mm(left.t(), right, out=gradient), weight)
        del gradient

    def _fill_batch_sensitivity(
        self, values: torch.Tensor, target: TargetModule, weight: torch.Tensor, inputs: torch.Tensor,
        grad_output: torch.Tensor,
    ) -> None:
        """values_s = the batch's sensitivity from the weight gradient of the batch loss, for every sample."""
        flat_grad = grad_output.reshape(-1, grad_output.shape[-1])
        flat_inputs = inputs.detach().reshape(-1, inputs.shape[-1])
        delta = flat_grad[self.state.on(flat_grad.device).mask.reshape(-1)].to(weight.dtype)
        rows = flat_inputs[self.state.on(flat_inputs.device).mask.reshape(-1)].to(device=weight.device, dtype=weight.dtype)
        gradient = delta.t() @ rows if target.kind == "linear" else rows.t() @ delta
        values[:] = _mean_weighted_l1(gradient, weight)
        del gradient


def _stored_weight(target: TargetModule, dtype: torch.dtype) -> torch.Tensor:
    """W in the module's own storage layout (transposed for Conv1D), in `dtype`."""
    weight = target.weight_matrix(dtype, copy=False)
    return weight if target.kind == "linear" else weight.t()


def _mean_weighted_l1(gradient: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """mean_ij |W_ij G_ij|, overwriting `gradient`; the reduction accumulates in at least float32."""
    reduce_dtype = torch.promote_types(weight.dtype, torch.float32)
    # abs_ + sum: one fused pass each, about 3x faster on CPU than linalg.vector_norm(ord=1) with a dtype.
    return gradient.mul_(weight).abs_().sum(dtype=reduce_dtype) / weight.numel()
