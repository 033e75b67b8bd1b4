"""Every calibration batch is checked before it enters the model, and settings that cannot work are refused early:
each error names the batch and row (or the setting) and says what to fix."""

import copy

import pytest
import torch

from conftest import LLAMA_TARGETS, CountingBatches, pad_batches
from tlora import BudgetError, CalibrationError, TLoRAConfig, compute_statistics, derive_plan, get_tlora_model
from tlora.allocation import ModuleInfo


def _config(**overrides):
    values = dict(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, task_type="CAUSAL_LM")
    values.update(overrides)
    return TLoRAConfig(**values)


def _calibrate(llama, batches):
    return compute_statistics(copy.deepcopy(llama), batches, _config(), show_progress=False)


def _shorter_labels(batch):
    batch["labels"] = batch["labels"][:, :-1]


def _fewer_label_rows(batch):
    batch["labels"] = batch["labels"][:1]


@pytest.mark.parametrize("index", [0, 1, 2])
@pytest.mark.parametrize(
    "fault,message",
    [
        (_shorter_labels, r"calibration batch {index}, row 0: \d+ token labels for \d+ input_ids.*padded with -100"),
        (_fewer_label_rows, r"calibration batch {index}: labels of shape \(1, \d+\) for the 2 rows.*row 1 has none"),
    ],
    ids=["shorter labels", "fewer label rows"],
)
def test_malformed_labels_in_any_batch_name_the_batch_and_row(llama, samples, index, fault, message):
    batches = pad_batches(samples, 2)
    fault(batches[index])
    with pytest.raises(CalibrationError, match=message.format(index=index)):
        _calibrate(llama, batches)


def test_a_token_id_beyond_the_vocabulary_names_batch_row_and_id(llama, samples):
    batches = pad_batches(samples, 2)
    batches[1]["input_ids"][1, 3] = 260  # the tiny Llama has 260 input embeddings (ids 0 to 259)
    with pytest.raises(CalibrationError, match=r"batch 1, row 1 has token id 260, outside .* vocabulary of 260"):
        _calibrate(llama, batches)


def test_a_one_token_sample_has_no_predicted_token(llama, samples):
    one_token = {"input_ids": torch.tensor([1]), "attention_mask": torch.tensor([1]), "labels": torch.tensor([1])}
    batches = pad_batches(samples[:3] + [one_token] + samples[3:], 2)  # batch 1 = (sample 2, the one-token sample)
    with pytest.raises(CalibrationError, match=r"batch 1, row 1 has no predicted token.*drop such rows"):
        _calibrate(llama, batches)


def test_a_batch_of_one_token_samples_is_refused_before_the_model_runs(llama):
    batches = [{"input_ids": torch.tensor([[5], [7]]), "attention_mask": torch.ones(2, 1, dtype=torch.long),
                "labels": torch.tensor([[5], [7]])}]
    with pytest.raises(CalibrationError, match=r"batch 0, row 0 has no predicted token"):
        _calibrate(llama, batches)


def test_an_all_zero_attention_mask_names_batch_and_row(llama, samples):
    batches = pad_batches(samples, 2)
    batches[2]["attention_mask"][1] = 0
    with pytest.raises(CalibrationError, match=r"batch 2, row 1 has an all-zero attention_mask.*drop empty rows"):
        _calibrate(llama, batches)


def test_all_zero_attention_masks_everywhere_are_refused_at_batch_0(llama, samples):
    batches = pad_batches(samples, 3)
    for batch in batches:
        batch["attention_mask"].zero_()
    with pytest.raises(CalibrationError, match=r"batch 0, row 0 has an all-zero attention_mask"):
        get_tlora_model(copy.deepcopy(llama), _config(), batches, show_progress=False)


@pytest.mark.parametrize("alpha", [0, -1])
def test_lora_alpha_must_be_positive(alpha):
    with pytest.raises(ValueError, match=rf"lora_alpha must be positive, got {alpha}: .*scaling is lora_alpha / r"):
        _config(lora_alpha=alpha)


def test_a_parameter_budget_below_one_rank_1_adapter_is_refused_before_calibration(llama, samples):
    # Every projection of the tiny Llama has 32 or 48 outputs: with A frozen, rank 1 costs at least 32 parameters.
    batches = CountingBatches(pad_batches(samples, 3))
    with pytest.raises(BudgetError, match=r"parameter budget 1 is too small .* give parameter_budget >= 32"):
        get_tlora_model(copy.deepcopy(llama), _config(parameter_budget=1), batches, show_progress=False)
    assert batches.taken == 0


def test_derive_plan_states_the_minimum_parameter_budget():
    modules = [ModuleInfo("a", 16, 8, 1.0), ModuleInfo("b", 4, 12, 2.0)]
    with pytest.raises(BudgetError, match=r"cheapest, on b, costs 16 parameters .* >= 16"):
        derive_plan(modules, r=2, lora_alpha=4, parameter_budget=15, freeze_lora_A=False)
    plan = derive_plan(modules, r=2, lora_alpha=4, parameter_budget=16, freeze_lora_A=False)
    assert plan.total_rank == 1 and plan.module("b").rank == 1
