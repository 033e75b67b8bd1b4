"""`statistics_passes`: the statistics collected in several passes, each holding one group of layers, give exactly
the plan and A of one pass, hold less at once, and refuse what cannot be read twice."""

import copy

import pytest
import torch

from tlora import TLoRAConfig, get_tlora_model
from tlora.calibration import PassShare, compute_statistics
from tlora.calibration.layout import statistic_groups
from tlora.errors import CalibrationError
from tlora.targets import find_target_modules

from conftest import LLAMA_TARGETS, CountingBatches, pad_batches


def config(**options):
    return TLoRAConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, task_type="CAUSAL_LM", **options)


def lora_A_and_plan(model):
    tuner = model.base_model
    state = {name: value for name, value in model.state_dict().items() if "lora_A" in name}
    return state, tuner.tlora_plan("default").to_dict()


@pytest.mark.parametrize("passes", [2, 3, 20])
def test_passes_give_the_plan_and_A_of_one_pass(llama, samples, passes):
    batches = pad_batches(samples, 3)
    one = get_tlora_model(copy.deepcopy(llama), config(), batches, show_progress=False)
    several = get_tlora_model(copy.deepcopy(llama), config(statistics_passes=passes), batches, show_progress=False)
    A_one, plan_one = lora_A_and_plan(one)
    A_several, plan_several = lora_A_and_plan(several)
    assert plan_one == plan_several
    assert A_one.keys() == A_several.keys() and len(A_one) >= 8
    for name in A_one:
        torch.testing.assert_close(A_several[name], A_one[name], rtol=0, atol=1e-6, msg=name)


def test_each_pass_holds_only_its_group_and_the_groups_cover_every_statistic(llama, samples):
    batches = pad_batches(samples, 3)
    whole = compute_statistics(llama, batches, config(), show_progress=False)
    targets = find_target_modules(llama, config())
    layout = {record.name: (record.layout, record.covariance_key) for record in whole.modules}
    groups = statistic_groups(targets, layout, 2)
    assert len(groups) == 2 and groups[0] and groups[1] and not groups[0] & groups[1]
    assert groups[0] | groups[1] == set(whole.covariances) | set(whole.cross_covariances)
    held = []
    for index, sensitivity in ((1, True), (0, False)):
        part = compute_statistics(llama, batches, config(), show_progress=False, share=PassShare(index, 2, sensitivity))
        assert set(part.covariances) | set(part.cross_covariances) == groups[index]
        for key, value in {**part.covariances, **part.cross_covariances}.items():
            expected = whole.covariances.get(key, whole.cross_covariances.get(key))
            torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-6)
        held.append(part.nbytes())
        if sensitivity:
            assert part.sensitivities() == whole.sensitivities()
    assert max(held) < 0.75 * whole.nbytes() and sum(held) == whole.nbytes()


def test_a_forward_only_pass_stops_after_its_last_module(llama, samples):
    """The earlier group's pass never reaches the later layers: a hook on the last decoder layer never fires."""
    batches = pad_batches(samples, 3)
    fired = []
    handle = llama.model.layers[-1].register_forward_hook(lambda *args: fired.append(1))
    try:
        compute_statistics(llama, batches, config(), show_progress=False, share=PassShare(0, 2, False))
        assert fired == [1]  # the layout probe only
        fired.clear()
        compute_statistics(llama, batches, config(), show_progress=False, share=PassShare(1, 2, True))
        assert len(fired) == len(batches) + 1  # every batch, plus the layout probe
    finally:
        handle.remove()


def test_passes_refuse_calibration_data_that_can_be_read_only_once(llama, samples):
    batches = pad_batches(samples, 3)
    with pytest.raises(CalibrationError, match="statistics_passes=2 reads calibration_data 2 times"):
        get_tlora_model(llama, config(statistics_passes=2), iter(batches), show_progress=False)
    counting = CountingBatches(batches)  # re-iterable: read once per pass
    get_tlora_model(llama, config(statistics_passes=2), counting, show_progress=False)
    assert counting.taken == 2 * len(batches)


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "2"])
def test_statistics_passes_must_be_a_positive_integer(value):
    with pytest.raises(ValueError, match="statistics_passes must be a positive integer"):
        config(statistics_passes=value)


def test_passes_refuse_a_statistics_cache(llama, samples, tmp_path):
    """The cache holds every statistic at once: combined with passes it would silently take the memory back."""
    with pytest.raises(ValueError, match="cannot be combined with statistics_cache"):
        get_tlora_model(
            llama, config(statistics_passes=2), pad_batches(samples, 3), statistics_cache=tmp_path / "s.safetensors",
            show_progress=False,
        )
    assert not (tmp_path / "s.safetensors").exists()
