"""GPT-2 (Conv1D, transposed weights), a BERT sequence classifier, and a bfloat16 Llama."""

import copy

import pytest
import torch

from core_reference import projector_gap, reference_A, reference_statistics
from conftest import LLAMA_TARGETS, pad_batches
from tlora import TLoRAConfig, compute_statistics, get_tlora_model


@pytest.fixture
def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=260, n_embd=32, n_layer=2, n_head=4, n_positions=256, bos_token_id=1,
                        eos_token_id=2, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


def test_gpt2_conv1d_statistics_and_A_match_reference(gpt2, samples):
    config = TLoRAConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], task_type="CAUSAL_LM",
                         fan_in_fan_out=True)
    names = [n for n, m in gpt2.named_modules() if n.endswith(("c_attn", "c_proj", "c_fc"))]
    covariance, sensitivity, weights = reference_statistics(gpt2, samples, names)
    statistics = compute_statistics(gpt2, pad_batches(samples, 3), config, show_progress=False)
    for name in names:
        assert statistics.module(name).kind == "conv1d"
        assert (statistics.module(name).out_features, statistics.module(name).in_features) == tuple(weights[name].shape)
        expected = weights[name] @ covariance[name]
        got = statistics.weighted_covariance(name, weights[name].clone())
        assert torch.linalg.norm(got - expected) <= 1e-5 * torch.linalg.norm(expected), name
        assert statistics.sensitivity(name) == pytest.approx(sensitivity[name], rel=1e-4), name
    # mlp.c_proj reads its own input and maps 128 -> 32: stored directly as W C.
    assert statistics.module("transformer.h.0.mlp.c_proj").layout == "cross"

    batch = pad_batches(samples, 6)[0]
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        before = gpt2(**inputs).logits.clone()
    model = get_tlora_model(gpt2, config, statistics=statistics, show_progress=False)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)
    layers = dict(model.base_model.model.named_modules())
    for entry in model.base_model.tlora_plan().modules:
        if entry.rank:
            a = layers[entry.name].lora_A["default"].weight.detach().numpy()
            assert projector_gap(a, reference_A(weights[entry.name], covariance[entry.name], entry.rank)) < 1e-4


def test_bert_sequence_classifier_trains_its_head_and_B(samples):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    bert = BertForSequenceClassification(
        BertConfig(vocab_size=260, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                   max_position_embeddings=256, num_labels=3, hidden_dropout_prob=0.1, pad_token_id=0)
    )
    rows = [{"input_ids": s["input_ids"], "attention_mask": s["attention_mask"]} for s in samples]
    for index, row in enumerate(rows):
        row["labels"] = torch.tensor(index % 3)
    batches = []
    for start in range(0, len(rows), 3):
        chunk = rows[start : start + 3]
        length = max(len(r["input_ids"]) for r in chunk)
        batches.append({
            "input_ids": torch.stack([torch.cat([r["input_ids"], torch.zeros(length - len(r["input_ids"]), dtype=torch.long)]) for r in chunk]),
            "attention_mask": torch.stack([torch.cat([r["attention_mask"], torch.zeros(length - len(r["input_ids"]), dtype=torch.long)]) for r in chunk]),
            "labels": torch.stack([r["labels"] for r in chunk]),
        })
    targets = ["query", "key", "value", "dense"]
    with pytest.raises(Exception, match="pooler.dense"):
        compute_statistics(bert, batches, TLoRAConfig(r=4, target_modules=targets, task_type="SEQ_CLS"),
                           show_progress=False)
    config = TLoRAConfig(r=4, lora_alpha=8, target_modules=targets, exclude_modules=["pooler.dense"],
                         task_type="SEQ_CLS")
    single = compute_statistics(bert, [{k: v[i : i + 1] for k, v in b.items()} for b in batches for i in range(3)],
                                config, show_progress=False)
    # Per-sample sensitivities do not depend on the batch size (classification losses split per sample).
    batched = compute_statistics(bert, batches, config, show_progress=False)
    for name in single.module_names:
        assert batched.sensitivity(name) == pytest.approx(single.sensitivity(name), rel=1e-4)
    model = get_tlora_model(bert, config, statistics=batched, show_progress=False)
    plan = model.base_model.tlora_plan()
    assert all("classifier" not in m.name and "pooler" not in m.name for m in plan.modules)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("classifier" in n and "modules_to_save" in n for n in trainable)
    assert all("lora_A" not in n for n in trainable) and any("lora_B" in n for n in trainable)


def test_bfloat16_model_gets_float32_statistics_and_float32_A(samples):
    from tlora.fixtures.toy import tiny_llama

    full = tiny_llama(hidden_size=32, num_layers=2, intermediate_size=48, num_heads=4, seed=0)
    half = copy.deepcopy(full).to(torch.bfloat16)
    config = TLoRAConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, task_type="CAUSAL_LM")
    batches = pad_batches(samples, 3)
    statistics = compute_statistics(half, batches, config, show_progress=False)
    assert all(v.dtype == torch.float32 for v in statistics.covariances.values())
    reference = compute_statistics(full, batches, config, show_progress=False)
    for key, value in reference.covariances.items():
        assert torch.linalg.norm(statistics.covariances[key] - value) < 0.05 * torch.linalg.norm(value)
    inputs = {k: batches[0][k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        before = half(**inputs).logits.clone()
    model = get_tlora_model(half, config, statistics=statistics, show_progress=False)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)
    for name, parameter in model.named_parameters():
        if "lora_A" in name:
            assert parameter.dtype == torch.float32  # PEFT autocasts adapters of bf16 models to float32
            assert torch.allclose(parameter @ parameter.t(), torch.eye(parameter.shape[0]), atol=1e-5)
