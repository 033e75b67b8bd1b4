"""TLoRA on a base loaded with bitsandbytes (4-bit NF4/FP4 and 8-bit, on the CPU): statistics read the dequantised
weights, PEFT's bitsandbytes LoRA layers carry the adapter, and stock PEFT reloads it onto the quantised base."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import bnb as peft_bnb

from tlora import CalibrationError, TLoRAConfig, compute_statistics, find_target_modules, get_tlora_model
from tlora.fixtures.toy import tiny_llama
from conftest import LLAMA_TARGETS, pad_batches

bnb = pytest.importorskip("bitsandbytes")
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny float Llama saved to disk, the checkpoint the quantised bases are loaded from."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(hidden_size=64, num_layers=2, intermediate_size=128, num_heads=4, seed=0).save_pretrained(path)
    return path


def load_quantized(path, bits: int, quant_type: str = "nf4"):
    """The checkpoint loaded as QLoRA users do: BitsAndBytesConfig, float32 compute, on the CPU."""
    if bits == 4:
        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_compute_dtype=torch.float32
        )
    else:
        quantization = BitsAndBytesConfig(load_in_8bit=True)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization, dtype=torch.float32, device_map="cpu")


def dequantized_float_twin(path, quantized):
    """The float model whose target weights are the quantised model's dequantised ones."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    config = TLoRAConfig(target_modules=LLAMA_TARGETS)
    floats = {t.name: t for t in find_target_modules(model, config)}
    with torch.no_grad():
        for target in find_target_modules(quantized, config):
            floats[target.name].module.weight.copy_(target.weight_matrix(torch.float32))
    return model


def calibration_batches(samples):
    return pad_batches(samples, batch_size=3)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_statistics_equal_those_of_the_dequantised_float_model(model_dir, samples, quant_type):
    quantized = load_quantized(model_dir, 4, quant_type)
    config = TLoRAConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS)
    targets = find_target_modules(quantized, config)
    assert {t.storage for t in targets} == {"bnb-4bit"}
    q_proj = next(t for t in targets if t.name.endswith("layers.0.self_attn.q_proj"))
    # The packed weight is (out*in/2, 1) uint8; the shapes come from the layer.
    assert tuple(q_proj.module.weight.shape) == (64 * 64 // 2, 1)
    assert (q_proj.out_features, q_proj.in_features) == (64, 64)
    reference = dequantized_float_twin(model_dir, quantized)
    batches = calibration_batches(samples)
    got = compute_statistics(quantized, batches, config, show_progress=False)
    want = compute_statistics(reference, batches, config, show_progress=False)
    assert got.module_names == want.module_names
    for key, value in want.covariances.items():
        torch.testing.assert_close(got.covariances[key], value, rtol=1e-5, atol=1e-6)
    for key, value in want.cross_covariances.items():
        torch.testing.assert_close(got.cross_covariances[key], value, rtol=1e-5, atol=1e-6)
    for name, value in want.sensitivities().items():
        assert got.sensitivity(name) == pytest.approx(value, rel=1e-5)
    # The dequantised weight is fingerprinted, so the statistics also match the float twin.
    got.check_matches(find_target_modules(reference, config))


def test_4bit_adapter_trains_B_and_reloads_in_stock_peft(model_dir, samples, tmp_path):
    quantized = load_quantized(model_dir, 4)
    config = TLoRAConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS)
    batches = calibration_batches(samples)
    reference = dequantized_float_twin(model_dir, quantized)
    float_model = get_tlora_model(reference, config, batches, show_progress=False)
    model = get_tlora_model(quantized, config, batches, show_progress=False)
    layer = model.base_model.model.model.layers[0].self_attn.v_proj  # allocated the largest rank
    assert isinstance(layer, peft_bnb.Linear4bit)  # PEFT's own bitsandbytes LoRA layer carries the adapter
    # A from the dequantised W C equals A of the float twin.
    float_layer = float_model.base_model.model.model.layers[0].self_attn.v_proj
    torch.testing.assert_close(layer.lora_A["default"].weight, float_layer.lora_A["default"].weight, rtol=1e-4, atol=1e-5)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dim() == 2 for p in trainable)
    A_before = layer.lora_A["default"].weight.detach().clone()
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    model.train()
    losses = []
    for step in range(4):
        loss = model(**batches[step % len(batches)]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert layer.lora_B["default"].weight.abs().max() > 0
    assert losses[2] < losses[0]  # the same batch, two optimiser steps later
    assert torch.equal(layer.lora_A["default"].weight, A_before)
    model.eval()
    probe = batches[0]
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(load_quantized(model_dir, 4), str(tmp_path / "adapter"))
    reloaded.eval()
    with torch.no_grad():
        again = reloaded(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    torch.testing.assert_close(again, logits, rtol=0, atol=1e-5)


def test_8bit_weights_are_read_with_their_scales(model_dir, samples):
    quantized = load_quantized(model_dir, 8)
    original = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = TLoRAConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS)
    targets = find_target_modules(quantized, config)
    assert {t.storage for t in targets} == {"bnb-8bit"}
    floats = {t.name: t for t in find_target_modules(original, config)}
    for target in targets:
        assert target.module.weight.dtype == torch.int8
        weight = target.weight_matrix(torch.float32)
        exact = floats[target.name].weight_matrix(torch.float32)
        # Row-wise absmax int8 with float16 scales: every entry within half a step (absmax / 127 / 2) of the float
        # weight, up to the scale's float16 rounding; the raw int8 matrix read without its scales is ~100x off.
        absmax = exact.abs().amax(dim=1, keepdim=True)
        assert bool(((weight - exact).abs() <= 0.5 * absmax / 127 + 1e-3 * absmax).all()), target.name
        assert (target.module.weight.float() - exact).abs().max() > 50 * absmax.max()
    statistics = compute_statistics(quantized, calibration_batches(samples), config, show_progress=False)
    reference = compute_statistics(original, calibration_batches(samples), config, show_progress=False)
    # The first layer's attention input does not pass through any quantised layer: identical covariance.
    key = "model.layers.0.self_attn.q_proj"
    torch.testing.assert_close(statistics.covariances[key], reference.covariances[key], rtol=1e-6, atol=1e-6)
    for name, value in reference.sensitivities().items():
        assert statistics.sensitivity(name) == pytest.approx(value, rel=0.1), name


def test_a_linear_with_integer_weights_is_refused_by_name(llama):
    layer = llama.model.layers[1].mlp.up_proj
    layer.weight = torch.nn.Parameter(torch.zeros_like(layer.weight, dtype=torch.int8), requires_grad=False)
    with pytest.raises(CalibrationError, match=r"model\.layers\.1\.mlp\.up_proj .*torch\.int8.*bitsandbytes"):
        find_target_modules(llama, TLoRAConfig(target_modules=LLAMA_TARGETS))


def test_a_quantised_layer_of_another_library_is_refused_by_name(llama):
    class QuantLinear(torch.nn.Module):  # what GPTQ / AWQ layers look like: not an nn.Linear
        def __init__(self):
            super().__init__()
            self.register_buffer("qweight", torch.zeros(4, 4, dtype=torch.int32))

    llama.model.layers[0].self_attn.v_proj = QuantLinear()
    with pytest.raises(CalibrationError, match=r"model\.layers\.0\.self_attn\.v_proj \(QuantLinear\).*GPTQ"):
        find_target_modules(llama, TLoRAConfig(target_modules=LLAMA_TARGETS))
