"""float16 models: the calibration backward pass is loss-scaled, so small gradients do not underflow to zero."""

import copy
import logging

import pytest
import torch

from conftest import LLAMA_TARGETS, pad_batches
from tlora import TLoRAConfig, compute_statistics
from tlora.calibration import sensitivity as calibration


def _config():
    return TLoRAConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, task_type="CAUSAL_LM")


@pytest.fixture
def small_gradient_llama(llama):
    """A tiny Llama whose output head is scaled down 1000x: its gradients are tiny, below float16's normal range."""
    with torch.no_grad():
        llama.lm_head.weight.mul_(1e-3)
    return llama


def _relative_errors(statistics, reference):
    got, expected = statistics.sensitivities(), reference.sensitivities()
    return {name: abs(got[name] - expected[name]) / expected[name] for name in expected}


def test_fp16_sensitivities_match_float32_where_unscaled_gradients_underflow(
    small_gradient_llama, samples, monkeypatch, caplog
):
    batches = pad_batches(samples, 3)
    reference = compute_statistics(small_gradient_llama, batches, _config(), show_progress=False)
    half = copy.deepcopy(small_gradient_llama).half()
    with caplog.at_level(logging.INFO, logger="tlora.calibration"):
        scaled = compute_statistics(half, batches, _config(), show_progress=False)
    assert "loss scale" in caplog.text
    assert max(_relative_errors(scaled, reference).values()) < 2e-3

    monkeypatch.setattr(calibration, "FP16_INITIAL_LOSS_SCALE", 1.0)
    unscaled = _relative_errors(compute_statistics(half, batches, _config(), show_progress=False), reference)
    # Without a loss scale the key projections' gradients underflow: their sensitivity collapses towards 0.
    assert unscaled["model.layers.1.self_attn.k_proj"] > 0.9
    assert max(unscaled.values()) > 0.9


def test_an_overflowing_loss_scale_is_lowered_and_the_batch_redone(small_gradient_llama, samples, monkeypatch, caplog):
    batches = pad_batches(samples, 3)
    half = copy.deepcopy(small_gradient_llama).half()
    expected = compute_statistics(half, batches, _config(), show_progress=False)
    monkeypatch.setattr(calibration, "FP16_INITIAL_LOSS_SCALE", 2.0**60)  # far beyond float16's range
    with caplog.at_level(logging.INFO, logger="tlora.calibration"):
        retried = compute_statistics(half, batches, _config(), show_progress=False)
    assert "gradients overflowed in batch 0" in caplog.text
    assert max(_relative_errors(retried, expected).values()) < 1e-3
    # The covariance is accumulated once per batch, not again on the redone backward pass.
    for key, value in expected.covariances.items():
        torch.testing.assert_close(retried.covariances[key], value)
    for key, value in expected.cross_covariances.items():
        torch.testing.assert_close(retried.cross_covariances[key], value)
    assert retried.num_samples == expected.num_samples == len(samples)


def test_float32_models_are_not_loss_scaled(llama):
    assert calibration.initial_loss_scale(llama) == 1.0
