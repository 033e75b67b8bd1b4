"""`BatchState` resets itself: a redone backward pass and a pass over one sample start from a clean state, and the
calibration pass that relies on them (the per-sample fallback) gives the statistics of the batched pass."""

from __future__ import annotations

import pytest
import torch

from conftest import LLAMA_TARGETS, pad_batches
from tlora import TLoRAConfig, compute_statistics
from tlora.calibration import sensitivity
from tlora.calibration.batch_state import BatchState


def padded_state() -> BatchState:
    return BatchState.for_batch(torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]]), batch_index=2, sample_offset=6)


def test_reset_for_redo_forgets_the_backward_results_and_stops_the_covariance():
    state = padded_state()
    state.calls["q"] = 1
    state.saved_inputs["q"] = torch.ones(1)
    state.per_sample_sensitivity["q"] = torch.ones(2)
    state.gradient_flags.append(("q", torch.tensor([True, False])))
    state.input_flags.append(("q", torch.tensor([True, True])))
    state.reset_for_redo()
    assert (state.calls, state.saved_inputs, state.per_sample_sensitivity) == ({}, {}, {})
    assert (state.gradient_flags, state.input_flags) == ([], [])
    assert state.collect_covariance is False and state.collect_sensitivity is True


def test_a_sample_pass_counts_calls_afresh_and_keeps_its_sensitivity_in_its_row():
    state = padded_state()
    state.calls["q"] = 1
    with state.sample_pass(1):
        assert state.calls == {} and state.per_sample_sensitivity == {}
        assert tuple(state.mask.shape) == (1, 4) and state.positions == [slice(1, 4)]
        state.per_sample_sensitivity["q"] = torch.tensor([2.5], dtype=torch.float64)
    assert tuple(state.mask.shape) == (2, 4)
    assert state.per_sample_sensitivity["q"].tolist() == [0.0, 2.5]


def test_the_per_sample_fallback_gives_the_statistics_of_the_batched_pass(llama, samples, monkeypatch):
    config = TLoRAConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, task_type="CAUSAL_LM")
    batches = pad_batches(samples[:4], 2)
    batched = compute_statistics(llama, batches, config, show_progress=False)
    monkeypatch.setattr(sensitivity, "per_sample_losses", lambda *args, **kwargs: None)  # no split: one pass per sample
    one_by_one = compute_statistics(llama, batches, config, show_progress=False)
    for name, value in batched.sensitivities().items():
        assert one_by_one.sensitivity(name) == pytest.approx(value, rel=1e-5)
    for key, value in batched.covariances.items():
        torch.testing.assert_close(one_by_one.covariances[key], value)
