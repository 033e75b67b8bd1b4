"""The hooks of the calibration pass: forward hooks accumulate each target's input covariance C (or W C), gradient
hooks hand each target's output gradient to `sensitivity.sample_sensitivities`.

All state lives outside the model: `BatchState` (batch_state.py) describes the batch being processed,
`StatisticSums` holds the running sums, and `CalibrationHooks` registers and removes the hooks.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Callable, Optional

import torch
from torch import nn

from ..errors import CalibrationError
from ..targets import TargetModule
from .batch_state import BatchState
from .layout import Layout
from .sensitivity import sample_sensitivities


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

    def ensure_all(self, targets: list[TargetModule], layout: Layout, only: Optional[frozenset] = None) -> None:
        """Create zero sums for every statistic (of `only`, if given) not seen yet (a rank that processed no batch)."""
        for target in targets:
            kind, key = layout[target.name]
            if only is not None and key not in only:
                continue
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


class ForwardComplete(Exception):
    """Raised by the hook that accumulated a forward-only pass's last statistic: the rest of the forward is skipped."""


class CalibrationHooks:
    """Forward and gradient hooks that accumulate the statistics of the target modules into `sums`.

    `only` (statistic keys, see layout.py) restricts the statistics collected to those keys; with `stop_early` the
    forward pass is cut (`ForwardComplete`) once all of them have been accumulated (a forward-only pass)."""

    def __init__(
        self, targets: list[TargetModule], layout: Layout, sums: StatisticSums, sensitivity_mode: str,
        only: Optional[frozenset] = None, stop_early: bool = False,
    ):
        self.targets = {t.name: t for t in targets}
        self.layout = layout
        self.sums = sums
        self.sensitivity_mode = sensitivity_mode
        self.only = only
        self.stop_early = stop_early and only is not None
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
        if self.only is not None and key not in self.only:
            return  # collected in another pass (statistics_passes)
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
        state.accumulated += 1
        if self.stop_early and state.accumulated == len(self.only):
            raise ForwardComplete()

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
    def _on_gradient(self, name: str, grad_output: torch.Tensor) -> None:
        """Record the per-sample sensitivity of target `name` (see sensitivity.py) and whether it is finite."""
        state = self.state
        inputs = state.saved_inputs.pop(name, None)
        if inputs is None:
            return
        values = sample_sensitivities(
            self.sensitivity_mode, self.targets[name], inputs, grad_output, state, self.sums.dtype
        )
        # A NaN or Inf in the output gradient (or the saved input) propagates into these values.
        state.gradient_flags.append((name, torch.isfinite(values)))
        state.per_sample_sensitivity[name] = values
