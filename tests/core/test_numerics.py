"""TLoRA's statistics, plan and A against the independent float64 reference (tests/core/core_reference.py)."""

import numpy as np
import pytest
import torch

from core_reference import (
    projector_gap,
    reference_A,
    reference_alphas,
    reference_ranks,
    reference_statistics,
)
from conftest import LLAMA_TARGETS, pad_batches
from tlora import TLoRAConfig, compute_statistics, find_target_modules, get_tlora_model


def _config(**overrides):
    values = dict(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, task_type="CAUSAL_LM")
    values.update(overrides)
    return TLoRAConfig(**values)


@pytest.fixture
def reference(llama, samples):
    names = [t.name for t in find_target_modules(llama, _config())]
    return reference_statistics(llama, samples, names), names


@pytest.mark.parametrize("batch_size", [1, 4])
def test_statistics_match_float64_reference_on_padded_batches(llama, samples, reference, batch_size):
    (covariance, sensitivity, weights), names = reference
    batches = pad_batches(samples, batch_size)
    assert any((b["attention_mask"] == 0).any() for b in batches) or batch_size == 1
    statistics = compute_statistics(llama, batches, _config(), show_progress=False)
    assert statistics.num_samples == len(samples)
    assert statistics.num_tokens == sum(len(s["input_ids"]) for s in samples)
    for name in names:
        record = statistics.module(name)
        expected_m = weights[name] @ covariance[name]
        if record.layout == "covariance":
            got = statistics.covariance(name).double()
            assert torch.linalg.norm(got - covariance[name]) <= 1e-5 * torch.linalg.norm(covariance[name]), name
        got_m = statistics.weighted_covariance(name, weights[name].clone())
        assert torch.linalg.norm(got_m - expected_m) <= 1e-5 * torch.linalg.norm(expected_m), name
        assert statistics.sensitivity(name) == pytest.approx(sensitivity[name], rel=1e-4), name


def test_covariance_blocks_of_wide_modules_match_float64_reference(samples):
    # hidden 256: the covariances are accumulated by column blocks (upper triangle) and mirrored at the end.
    from tlora.fixtures.toy import tiny_llama

    model = tiny_llama(hidden_size=256, num_layers=1, intermediate_size=320, num_heads=4, seed=0)
    names = [t.name for t in find_target_modules(model, _config())]
    covariance, sensitivity, weights = reference_statistics(model, samples, names)
    statistics = compute_statistics(model, pad_batches(samples, 4), _config(), show_progress=False)
    for name in names:
        record = statistics.module(name)
        if record.layout == "covariance":
            got = statistics.covariance(name).double()
            assert torch.equal(got, got.t()), name
            assert torch.linalg.norm(got - covariance[name]) <= 1e-5 * torch.linalg.norm(covariance[name]), name
        expected_m = weights[name] @ covariance[name]
        got_m = statistics.weighted_covariance(name, weights[name].clone())
        assert torch.linalg.norm(got_m - expected_m) <= 1e-5 * torch.linalg.norm(expected_m), name
        assert statistics.sensitivity(name) == pytest.approx(sensitivity[name], rel=1e-4), name


def test_shared_inputs_store_one_covariance_and_down_proj_stores_w_c(llama, samples):
    statistics = compute_statistics(llama, pad_batches(samples, 3), _config(), show_progress=False)
    layer = "model.layers.0"
    q, k, v = (statistics.module(f"{layer}.self_attn.{p}") for p in ("q_proj", "k_proj", "v_proj"))
    assert q.layout == k.layout == v.layout == "covariance"
    assert q.covariance_key == k.covariance_key == v.covariance_key == f"{layer}.self_attn.q_proj"
    gate, up = statistics.module(f"{layer}.mlp.gate_proj"), statistics.module(f"{layer}.mlp.up_proj")
    assert gate.covariance_key == up.covariance_key
    down = statistics.module(f"{layer}.mlp.down_proj")
    assert down.layout == "cross" and f"{layer}.mlp.down_proj" in statistics.cross_covariances
    # 2 layers x (qkv, o, gate/up) covariances + 2 cross products for down_proj.
    assert len(statistics.covariances) == 6 and len(statistics.cross_covariances) == 2


def test_plan_and_A_match_reference(llama, samples, reference):
    (covariance, sensitivity, weights), names = reference
    config = _config(r=4, lora_alpha=8)
    model = get_tlora_model(llama, config, pad_batches(samples, 3), show_progress=False)
    plan = model.base_model.tlora_plan()
    values = [sensitivity[n] for n in names]
    capacities = [min(weights[n].shape) for n in names]
    assert [m.rank for m in plan.modules] == reference_ranks(values, capacities, 4 * len(names))
    alphas = reference_alphas(values, 8)
    for entry, alpha in zip(plan.modules, alphas):
        assert entry.alpha == alpha
        assert entry.scaling == pytest.approx(alpha / 4)
    tuner_layers = dict(model.base_model.model.named_modules())
    for entry in plan.modules:
        if entry.rank == 0:
            assert not hasattr(tuner_layers[entry.name], "lora_A"), entry.name
            continue
        layer = tuner_layers[entry.name]
        a = layer.lora_A["default"].weight.detach().double().numpy()
        expected = reference_A(weights[entry.name], covariance[entry.name], entry.rank)
        assert projector_gap(a, expected) < 1e-4, entry.name
        np.testing.assert_allclose(a @ a.T, np.eye(entry.rank), atol=1e-5)
        assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
        # PEFT realises the method's effective scaling alpha_l / r through alpha_pattern.
        assert layer.scaling["default"] == pytest.approx(entry.alpha / 4)


def test_batched_per_sample_sensitivity_equals_batch_size_one(llama, samples):
    single = compute_statistics(llama, pad_batches(samples, 1), _config(), show_progress=False)
    batched = compute_statistics(llama, pad_batches(samples, 6), _config(), show_progress=False)
    for name in single.module_names:
        assert batched.sensitivity(name) == pytest.approx(single.sensitivity(name), rel=1e-4)


def test_left_padding_excluded_from_covariance(llama, samples):
    right = compute_statistics(llama, pad_batches(samples, 3, side="right"), _config(), show_progress=False)
    # Covariance only: with left padding Llama's positions shift, so only the first layer's input is comparable.
    left = compute_statistics(llama, pad_batches(samples, 3, side="left"), _config(), show_progress=False)
    key = "model.layers.0.self_attn.q_proj"
    assert torch.allclose(left.covariances[key], right.covariances[key], rtol=1e-5, atol=1e-6)


def test_batch_mode_uses_the_micro_batch_gradient(llama, samples):
    config = _config(sensitivity="batch")
    batches = pad_batches(samples, 3)
    statistics = compute_statistics(llama, batches, config, show_progress=False)
    # Reference: |W * grad of the micro-batch's mean token loss|, weighted by the micro-batch's sample count.
    model = llama.double()
    names = statistics.module_names
    modules = dict(model.named_modules())
    weights = [modules[n].weight for n in names]
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for weight in weights:
        weight.requires_grad_(True)
    totals = dict.fromkeys(names, 0.0)
    for batch in batches:
        loss = model(**batch).loss
        for name, weight, grad in zip(names, weights, torch.autograd.grad(loss, weights)):
            totals[name] += float((weight * grad).abs().mean().detach()) * batch["input_ids"].shape[0]
    for name in names:
        assert statistics.sensitivity(name) == pytest.approx(totals[name] / len(samples), rel=1e-4)


def test_statistics_in_float64_agree_with_float32(llama, samples):
    batches = pad_batches(samples, 3)
    single = compute_statistics(llama, batches, _config(), show_progress=False)
    double = compute_statistics(llama, batches, _config(statistics_dtype="float64"), show_progress=False)
    for key, value in double.covariances.items():
        assert value.dtype == torch.float64
        assert torch.allclose(value.float(), single.covariances[key], rtol=1e-4, atol=1e-5)
