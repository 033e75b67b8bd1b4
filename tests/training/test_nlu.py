"""nlu_train.py: sequence classification through the same core (tiny Llama classifier on the shipped NLU sample)."""

from __future__ import annotations

import json

import pytest
import torch

from tlora.training import main
from training_helpers import LLAMA_TARGETS, SAMPLE_NLU, load_task

NLU = load_task("nlu_train.py")


def nlu_arguments(model_dir, output_dir, method: str) -> list[str]:
    return [
        "--base_model", str(model_dir),
        "--data_path", str(SAMPLE_NLU),
        "--dataset_field", "text", "label",
        "--eval_split", str(SAMPLE_NLU),
        "--method", method,
        "--target_modules", LLAMA_TARGETS,
        "--lora_r", "4",
        "--lora_alpha", "8",
        "--calibration_samples", "16",
        "--global_batch_size", "8",
        "--per_device_train_batch_size", "8",
        "--max_steps", "3",
        "--save_strategy", "no",
        "--disable_tqdm", "true",
        "--output_dir", str(output_dir),
    ]


@pytest.mark.parametrize("method", ["lora", "tlora"])
def test_sequence_classification_trains_the_adapter_and_the_head(method, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    record = main(NLU, nlu_arguments(tiny_model_dir, tmp_path, method))
    assert record["labels"] == [0, 1] and record["task"] == "nlu"
    assert 0.0 <= record["eval_metrics"]["eval_accuracy"] <= 1.0
    head = 64 * 2  # the new classification head (score: hidden -> 2 labels) trains in full
    if method == "tlora":
        plan = json.loads((tmp_path / "tlora_plan.json").read_text())
        assert all("score" not in m["name"] for m in plan["modules"])
        assert record["trainable_parameters"] == plan["trainable_parameters"] + head
        assert record["calibration"]["num_samples"] == 16
    else:
        base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
        lora = sum(4 * (m.in_features + m.out_features) for n, m in base.named_modules()
                   if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in LLAMA_TARGETS.split(","))
        assert record["trainable_parameters"] == lora + head
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2, pad_token_id=0)
    adapted = PeftModel.from_pretrained(base, str(tmp_path))
    with torch.no_grad():
        scores = adapted(input_ids=torch.tensor([[1, 70, 71, 72]])).logits
    assert scores.shape == (1, 2) and torch.isfinite(scores).all()


def test_eva_calibrates_a_classifier_with_one_label_per_sample(tiny_model_dir, tmp_path):
    # PEFT's EVA masks tokens with `labels != -100`, which fails on per-sample labels unless the label mask is off.
    record = main(NLU, nlu_arguments(tiny_model_dir, tmp_path, "eva") + ["--eva_max_passes", "1"])
    assert record["method"] == "eva" and record["status"] == "finished"
    assert record["method_details"]["forward_calls"] >= 1
