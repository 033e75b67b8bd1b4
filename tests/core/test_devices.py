"""Models spread over several devices and weights TLoRA cannot read: per-device batch views (cached per batch),
statistics placed on their modules' devices, clear errors for offloaded (meta) and ZeRO-3 partitioned weights."""

from __future__ import annotations

import pytest
import torch

from tlora import CalibrationError, TLoRAConfig, compute_statistics, find_target_modules, get_tlora_model
from tlora.calibration.statistics import place_statistics, statistics_devices
from tlora.calibration.batch_state import BatchState
from conftest import LLAMA_TARGETS, pad_batches

META = torch.device("meta")


def padded_state() -> BatchState:
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 0, 1]])
    return BatchState.for_batch(mask, batch_index=0, sample_offset=0)


def test_views_on_the_source_device_are_the_batch_tensors_themselves():
    state = padded_state()
    view = state.on(torch.device("cpu"))
    assert view.mask is state.mask and view.counts is state.counts and view.positions is state.positions
    assert state.device_views is None  # nothing was copied


def test_a_view_on_another_device_is_created_once_and_reused():
    state = padded_state()
    first = state.on(META)
    assert first.mask.device == META and first.counts.device == META
    assert first.positions[0] == slice(0, 3)  # slices need no copy
    assert first.positions[1].device == META  # index tensors move
    assert state.on(META) is first
    assert first.flat_valid is None or first.flat_valid.device == META
    assert state.mask.device.type == "cpu"  # the source stays where it was


def test_views_follow_a_single_sample_pass_and_are_restored_after_it():
    state = padded_state()
    whole = state.on(META)
    with state.single_sample(1):
        single = state.on(META)
        assert single is not whole and tuple(single.mask.shape) == (1, 4)
    assert state.on(META) is whole


def test_statistics_are_unchanged_on_a_single_device(llama, samples):
    # The per-device views are a no-op on one device: padded and unpadded batches give the reference values.
    config = TLoRAConfig(target_modules=LLAMA_TARGETS)
    padded = compute_statistics(llama, pad_batches(samples, 3), config, show_progress=False)
    one_by_one = compute_statistics(llama, pad_batches(samples, 1), config, show_progress=False)
    for key, value in one_by_one.covariances.items():
        torch.testing.assert_close(padded.covariances[key], value, rtol=1e-4, atol=1e-4)  # float32 sums, another order
    for name, value in one_by_one.sensitivities().items():
        assert padded.sensitivity(name) == pytest.approx(value, rel=1e-4)


def test_cached_statistics_go_to_each_module_s_device_or_statistics_device(llama, samples):
    config = TLoRAConfig(target_modules=LLAMA_TARGETS)
    targets = find_target_modules(llama, config)
    statistics = compute_statistics(llama, pad_batches(samples, 3), config, show_progress=False)
    devices = statistics_devices(statistics, targets)
    assert set(devices) == set(statistics.covariances) | set(statistics.cross_covariances)
    assert set(devices.values()) == {torch.device("cpu")}
    placed = place_statistics(statistics, targets, statistics_device=META)
    assert {t.device for t in placed.covariances.values()} == {META}
    assert {t.device for t in statistics.covariances.values()} == {torch.device("cpu")}  # the original is untouched


def test_an_offloaded_target_weight_is_refused_before_any_forward(llama, samples):
    llama.model.layers[1].mlp.down_proj.to(META)
    calls = []
    llama.register_forward_pre_hook(lambda *args: calls.append(1))
    with pytest.raises(CalibrationError, match=r"model\.layers\.1\.mlp\.down_proj is on the 'meta' device"):
        compute_statistics(llama, pad_batches(samples, 3), TLoRAConfig(target_modules=LLAMA_TARGETS), show_progress=False)
    assert calls == []


@pytest.mark.parametrize("with_ds_attributes", [True, False])
def test_a_zero3_partitioned_weight_is_refused_before_any_forward(llama, samples, tmp_path, with_ds_attributes):
    layer = llama.model.layers[0].self_attn.q_proj
    # What deepspeed.zero.Init leaves behind: an empty local shard, the full shape in ds_shape.
    layer.weight = torch.nn.Parameter(torch.empty(0), requires_grad=False)
    if with_ds_attributes:
        layer.weight.ds_shape = torch.Size([32, 32])
        layer.weight.ds_id = 0
    calls = []
    llama.register_forward_pre_hook(lambda *args: calls.append(1))
    config = TLoRAConfig(target_modules=LLAMA_TARGETS)
    pattern = r"model\.layers\.0\.self_attn\.q_proj is partitioned by DeepSpeed ZeRO-3.*ZeRO-2"
    with pytest.raises(CalibrationError, match=pattern):
        get_tlora_model(llama, config, pad_batches(samples, 3), show_progress=False)
    with pytest.raises(CalibrationError, match=pattern):  # also with cached statistics: A needs W too
        get_tlora_model(llama, config, statistics_cache=tmp_path / "missing.safetensors")
    assert calls == []
