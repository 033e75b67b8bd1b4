"""The three steps run on their own with plain data between them: statistics file -> plan JSON -> adapted model."""

import json

import torch

from conftest import LLAMA_TARGETS, pad_batches
from tlora import (
    TLoRAConfig,
    TLoRAPlan,
    TLoRAStatistics,
    apply_plan,
    compute_statistics,
    get_tlora_model,
    plan_from_statistics,
)
from tlora.fixtures.toy import tiny_llama


def _fresh():
    return tiny_llama(hidden_size=32, num_layers=2, intermediate_size=48, num_heads=4, seed=0)


def test_separate_steps_equal_the_one_call(samples, tmp_path):
    config = TLoRAConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, task_type="CAUSAL_LM")
    batches = pad_batches(samples, 3)

    statistics = compute_statistics(_fresh(), batches, config, show_progress=False)
    statistics.save(tmp_path / "statistics.safetensors")
    plan = plan_from_statistics(TLoRAStatistics.load(tmp_path / "statistics.safetensors"), config)
    plan.save(tmp_path / "tlora_plan.json")
    data = json.loads((tmp_path / "tlora_plan.json").read_text())
    assert {"name", "rank", "alpha", "scaling", "sensitivity", "budget_share"} <= set(data["modules"][0])
    assert abs(sum(m["budget_share"] for m in data["modules"]) - 1) < 1e-9
    stepwise = apply_plan(_fresh(), TLoRAPlan.load(tmp_path / "tlora_plan.json"),
                          TLoRAStatistics.load(tmp_path / "statistics.safetensors"), config, show_progress=False)

    one_call = get_tlora_model(_fresh(), config, batches, show_progress=False)
    assert stepwise.base_model.tlora_plan() == one_call.base_model.tlora_plan()
    first, second = stepwise.state_dict(), one_call.state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
