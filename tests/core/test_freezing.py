"""A stays frozen (and unchanged) while B trains, whatever PEFT's adapter toggles do."""

import pytest
import torch

from conftest import LLAMA_TARGETS, pad_batches
from tlora import TLoRAConfig, TLoRAModel, get_tlora_model, load_tlora_model, write_plan_reports


@pytest.fixture
def tlora_model(llama, samples):
    config = TLoRAConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, task_type="CAUSAL_LM")
    return get_tlora_model(llama, config, pad_batches(samples, 3), show_progress=False)


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_only_B_is_trainable(tlora_model):
    names = _trainable(tlora_model)
    assert names and all("lora_B" in n for n in names)
    plan = tlora_model.base_model.tlora_plan()
    assert sum(p.numel() for n, p in tlora_model.named_parameters() if p.requires_grad) == plan.trainable_parameters
    assert isinstance(tlora_model.base_model, TLoRAModel)


def test_adapter_toggles_keep_A_frozen(tlora_model):
    expected = _trainable(tlora_model)
    tlora_model.set_adapter("default")
    assert _trainable(tlora_model) == expected
    with tlora_model.disable_adapter():
        pass
    assert _trainable(tlora_model) == expected
    tlora_model.base_model.enable_adapter_layers()
    tlora_model.set_requires_grad("default", True)
    assert _trainable(tlora_model) == expected


def test_an_optimiser_step_changes_B_and_leaves_A_bit_identical(tlora_model, samples):
    before = {n: p.detach().clone() for n, p in tlora_model.named_parameters() if "lora_A" in n}
    optimiser = torch.optim.AdamW([p for p in tlora_model.parameters() if p.requires_grad], lr=1e-2)
    batch = pad_batches(samples, 3)[0]
    for _ in range(2):
        tlora_model(**batch).loss.backward()
        optimiser.step()
        optimiser.zero_grad()
    after = dict(tlora_model.named_parameters())
    assert all(torch.equal(after[n], value) for n, value in before.items())
    assert any(torch.count_nonzero(p) for n, p in after.items() if "lora_B" in n)


def test_reloading_for_training_refreezes_A_from_the_plan(tlora_model, tmp_path):
    from tlora.fixtures.toy import tiny_llama

    tlora_model.save_pretrained(tmp_path)
    write_plan_reports(tlora_model.base_model.tlora_plan(), tmp_path)
    base = tiny_llama(hidden_size=32, num_layers=2, intermediate_size=48, num_heads=4, seed=0)
    reloaded = load_tlora_model(base, tmp_path, is_trainable=True)
    names = _trainable(reloaded)
    assert names and all("lora_B" in n for n in names)
