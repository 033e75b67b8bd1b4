"""Statistics saved to safetensors, read back, checked against the model, and used as a cache."""

import copy

import pytest
import torch

from conftest import LLAMA_TARGETS, pad_batches
from tlora import StatisticsMismatchError, TLoRAConfig, TLoRAStatistics, compute_statistics, get_tlora_model


def _config(**overrides):
    values = dict(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, task_type="CAUSAL_LM")
    values.update(overrides)
    return TLoRAConfig(**values)


def test_round_trip_is_exact_and_file_is_safetensors(llama, samples, tmp_path):
    statistics = compute_statistics(llama, pad_batches(samples, 3), _config(), show_progress=False)
    path = statistics.save(tmp_path / "stats.safetensors")
    with open(path, "rb") as handle:
        header_length = int.from_bytes(handle.read(8), "little")
        assert handle.read(1) == b"{" and header_length > 0  # safetensors: 8-byte length + JSON header
    loaded = TLoRAStatistics.load(path)
    assert loaded.modules == statistics.modules
    assert loaded.num_samples == statistics.num_samples and loaded.num_tokens == statistics.num_tokens
    for key, value in statistics.covariances.items():
        assert torch.equal(loaded.covariances[key], value)
    for key, value in statistics.cross_covariances.items():
        assert torch.equal(loaded.cross_covariances[key], value)


def test_cache_skips_calibration_and_gives_the_same_model(llama, samples, tmp_path):
    cache = tmp_path / "cache.safetensors"
    base = copy.deepcopy(llama)
    first = get_tlora_model(llama, _config(), pad_batches(samples, 3), statistics_cache=cache, show_progress=False)
    assert cache.is_file()
    calls = []
    base.register_forward_hook(lambda *args: calls.append(1))
    second = get_tlora_model(base, _config(), None, statistics_cache=cache, show_progress=False)
    assert calls == []  # no calibration pass
    a1 = {k: v for k, v in first.state_dict().items() if "lora_A" in k}
    a2 = {k: v for k, v in second.state_dict().items() if "lora_A" in k}
    assert a1.keys() == a2.keys() and all(torch.equal(a1[k], a2[k]) for k in a1)


def test_statistics_of_another_model_are_rejected(llama, samples, tmp_path):
    statistics = compute_statistics(llama, pad_batches(samples, 3), _config(), show_progress=False)
    other = copy.deepcopy(llama)
    with torch.no_grad():
        other.model.layers[1].self_attn.o_proj.weight.mul_(1.5)
    with pytest.raises(StatisticsMismatchError, match=r"model\.layers\.1\.self_attn\.o_proj"):
        get_tlora_model(other, _config(), statistics=statistics)


def test_statistics_for_other_targets_are_rejected(llama, samples):
    statistics = compute_statistics(llama, pad_batches(samples, 3), _config(), show_progress=False)
    with pytest.raises(StatisticsMismatchError, match="do not match the model's target modules"):
        get_tlora_model(llama, _config(target_modules=["q_proj", "v_proj"]), statistics=statistics)


def test_not_a_statistics_file(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(StatisticsMismatchError, match="not a TLoRA statistics file"):
        TLoRAStatistics.load(tmp_path / "other.safetensors")


def test_calibration_restores_flags_mode_and_writes_no_gradients(llama, samples):
    llama.train()
    llama.model.embed_tokens.weight.requires_grad_(False)
    before = {n: p.requires_grad for n, p in llama.named_parameters()}
    compute_statistics(llama, pad_batches(samples, 3), _config(), show_progress=False)
    assert llama.training
    assert {n: p.requires_grad for n, p in llama.named_parameters()} == before
    assert all(p.grad is None for p in llama.parameters())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in llama.modules())


def test_statistics_can_be_offloaded_to_another_device(llama, samples):
    statistics = compute_statistics(llama, pad_batches(samples, 3), _config(statistics_device="cpu"), show_progress=False)
    assert all(v.device.type == "cpu" for v in statistics.covariances.values())
