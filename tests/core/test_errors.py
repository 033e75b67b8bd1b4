"""Bad input fails early with a message that names the problem."""

import pytest
import torch

from conftest import LLAMA_TARGETS, pad_batches
from tlora import (
    BudgetError,
    CalibrationError,
    NonFiniteCalibrationError,
    TLoRAConfig,
    compute_statistics,
    get_tlora_model,
)


def _config(**overrides):
    values = dict(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, task_type="CAUSAL_LM")
    values.update(overrides)
    return TLoRAConfig(**values)


def test_no_calibration_batches(llama):
    with pytest.raises(CalibrationError, match="no batches"):
        get_tlora_model(llama, _config(), [], show_progress=False)


def test_batches_without_labels(llama, samples):
    batches = pad_batches(samples, 3)
    for batch in batches:
        batch.pop("labels")
    with pytest.raises(CalibrationError, match="no 'labels'"):
        compute_statistics(llama, batches, _config(), show_progress=False)


def test_batches_that_are_not_dicts(llama):
    with pytest.raises(CalibrationError, match="dicts of tensors"):
        compute_statistics(llama, [torch.ones(2, 3, dtype=torch.long)], _config(), show_progress=False)


def test_model_that_returns_no_loss(samples):
    from transformers import LlamaConfig, LlamaModel

    model = LlamaModel(LlamaConfig(vocab_size=260, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=4))
    batches = pad_batches(samples, 3)
    with pytest.raises(CalibrationError, match="no loss"):
        compute_statistics(model, batches, _config(), show_progress=False)


def test_targets_that_match_no_module(llama, samples):
    with pytest.raises(CalibrationError, match="match no nn.Linear"):
        get_tlora_model(llama, _config(target_modules=["query_key_value"]), pad_batches(samples, 3))


def test_budget_smaller_than_min_rank_needs_fails_before_init(llama, samples):
    with pytest.raises(BudgetError, match="min_rank=2"):
        get_tlora_model(llama, _config(rank_budget=10, min_rank=2), pad_batches(samples, 3), show_progress=False)


def test_budget_beyond_capacity(llama, samples):
    # 14 modules of min(m, n) = 32 give a capacity of 448 ranks.
    with pytest.raises(BudgetError, match="capacity"):
        get_tlora_model(llama, _config(r=64), pad_batches(samples, 3), show_progress=False)


def test_nan_in_a_module_names_the_module_and_the_sample(llama, samples):
    batches = pad_batches(samples, 3)
    # Corrupt one sample's embedding row: token id of its first response token only appears in sample 4.
    unique = set(batches[1]["input_ids"][1].tolist()) - set(batches[0]["input_ids"].flatten().tolist())
    unique -= set(batches[1]["input_ids"][0].tolist()) | set(batches[1]["input_ids"][2].tolist())
    token = sorted(unique)[0]
    with torch.no_grad():
        llama.model.embed_tokens.weight[token] = float("nan")
    with pytest.raises(NonFiniteCalibrationError, match=r"model\.layers\.0\.self_attn\.q_proj.*sample 4 \(batch 1, row 1\)"):
        compute_statistics(llama, batches, _config(), show_progress=False)


def test_inf_in_a_weight_names_the_downstream_module(llama, samples):
    with torch.no_grad():
        llama.model.layers[1].mlp.up_proj.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteCalibrationError, match=r"input of module 'model\.layers\.1\.mlp\.down_proj'.*sample 0"):
        compute_statistics(llama, pad_batches(samples, 3), _config(), show_progress=False)


def test_invalid_config_values():
    with pytest.raises(ValueError, match="either rank_budget or parameter_budget"):
        _config(rank_budget=8, parameter_budget=100)
    with pytest.raises(ValueError, match="sensitivity"):
        _config(sensitivity="per_token")
    with pytest.raises(ValueError, match="svd_method"):
        _config(svd_method="qr")
    with pytest.raises(ValueError, match="init_lora_weights"):
        _config(init_lora_weights="pissa")
    with pytest.raises(ValueError, match="use_dora"):
        _config(use_dora=True)


def test_peft_model_instead_of_base_model(llama, samples):
    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(llama, LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(CalibrationError, match="base model"):
        get_tlora_model(wrapped, _config(), pad_batches(samples, 3))
