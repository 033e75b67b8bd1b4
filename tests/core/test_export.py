"""`tlora.export`: a TLoRA adapter (per-module ranks and alphas) written as a plain LoRA adapter that vLLM serves."""

import json
import math

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from conftest import pad_batches, trained_tlora
from tlora.export import (
    LLAMA_LORA_MODULES,
    VLLM_MAX_LORA_RANKS,
    AdapterExportError,
    VLLMCompatibilityError,
    check_vllm_compatible,
    export_for_vllm,
    main,
)

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"

def _write_adapter(directory, config, tensors):
    """A hand-written adapter folder (config + safetensors)."""
    directory.mkdir(parents=True, exist_ok=True)
    base = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "bias": "none"}
    (directory / CONFIG).write_text(json.dumps({**base, **config}))
    save_file(tensors, str(directory / WEIGHTS))
    return directory


def _pair(name, rank, features=4, dtype=torch.float32):
    """Random lora_A / lora_B tensors of one module, under PEFT's saved key names."""
    prefix = f"base_model.model.{name}"
    return {
        f"{prefix}.lora_A.weight": torch.randn(rank, features).to(dtype),
        f"{prefix}.lora_B.weight": torch.randn(features, rank).to(dtype),
    }


def test_exported_adapter_gives_the_tlora_logits_in_stock_peft_without_patterns(llama, samples, tmp_path):
    base_dir, adapter_dir, out_dir = tmp_path / "base", tmp_path / "adapter", tmp_path / "vllm"
    llama.save_pretrained(base_dir)
    model = trained_tlora(llama, samples, max_rank=6)
    plan = model.base_model.tlora_plan()
    ranks = {entry.rank for entry in plan.modules if entry.rank}
    scales = {entry.scaling for entry in plan.modules if entry.rank}
    assert len(ranks) > 1 and len(scales) > 1, "the test needs different ranks and scales per module"
    assert max(ranks) <= 6 and plan.total_rank == 4 * len(plan.modules)
    model.save_pretrained(adapter_dir)
    export_for_vllm(adapter_dir, out_dir)
    config = json.loads((out_dir / CONFIG).read_text())
    assert config["r"] == 8 and config["rank_pattern"] == {} and config["alpha_pattern"] == {}
    assert config["lora_alpha"] / config["r"] == 8 / 4  # the nominal scale alpha / r is kept
    assert config["target_modules"] == sorted(plan.target_modules())

    batch = pad_batches(samples, 6)[0]
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        expected = model(**inputs).logits
        with model.disable_adapter():
            base_logits = model(**inputs).logits
    # Stock PEFT on a fresh copy of the base model, from the exported folder alone (no rank or alpha patterns).
    stock = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(out_dir)).eval()
    assert not stock.peft_config["default"].rank_pattern and not stock.peft_config["default"].alpha_pattern
    with torch.no_grad():
        logits = stock(**inputs).logits
    assert (expected - base_logits).abs().max() > 1e-3, "the adapter changes the outputs"
    assert torch.allclose(logits, expected, atol=1e-5, rtol=0)


def test_export_folds_each_scale_into_B_and_pads_with_zeros(tmp_path):
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    tensors = {**_pair(names[0], 3), **_pair(names[1], 6), **_pair(names[2], 2)}
    config = {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "down_proj"],
        "rank_pattern": {"^model\\.layers\\.0\\.self_attn\\.q_proj$": 3, "layers.1.self_attn.q_proj": 6, "down_proj": 2},
        "alpha_pattern": {"^model\\.layers\\.0\\.self_attn\\.q_proj$": 9, "down_proj": 5},
    }
    adapter = _write_adapter(tmp_path / "adapter", config, tensors)
    export_for_vllm(adapter, tmp_path / "out", max_lora_rank=16)
    written = load_file(str(tmp_path / "out" / WEIGHTS))
    exported = json.loads((tmp_path / "out" / CONFIG).read_text())
    assert (exported["r"], exported["lora_alpha"]) == (16, 32)  # 32 / 16 = 8 / 4, the nominal scale
    assert exported["target_modules"] == sorted(names)
    # PEFT's scales: q0 9/3 = 3, q1 8/6 (no alpha key), down 5/2; the global one is 2.
    for name, rank, scale in ((names[0], 3, 3.0), (names[1], 6, 8 / 6), (names[2], 2, 2.5)):
        key = f"base_model.model.{name}"
        lora_A, lora_B = written[f"{key}.lora_A.weight"], written[f"{key}.lora_B.weight"]
        assert lora_A.shape == (16, 4) and lora_B.shape == (4, 16)
        assert torch.equal(lora_A[:rank], tensors[f"{key}.lora_A.weight"])
        assert torch.count_nonzero(lora_A[rank:]) == 0 and torch.count_nonzero(lora_B[:, rank:]) == 0
        assert torch.allclose(lora_B[:, :rank], tensors[f"{key}.lora_B.weight"] * scale / 2.0, atol=1e-6, rtol=0)
        original = 2.0 * lora_B @ lora_A  # what the exported adapter adds, with vLLM's single scale
        reference = scale * tensors[f"{key}.lora_B.weight"] @ tensors[f"{key}.lora_A.weight"]
        assert torch.allclose(original, reference, atol=1e-5)


def test_export_keeps_the_weight_dtype_and_folds_in_float32(tmp_path):
    tensors = _pair("model.layers.0.self_attn.q_proj", 3, dtype=torch.bfloat16)
    config = {"rank_pattern": {"q_proj": 3}, "alpha_pattern": {"q_proj": 7}}
    adapter = _write_adapter(tmp_path / "adapter", config, tensors)
    export_for_vllm(adapter, tmp_path / "out")
    written = load_file(str(tmp_path / "out" / WEIGHTS))
    lora_B = written["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert lora_B.dtype == torch.bfloat16 and lora_B.shape == (4, 8)
    source = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert torch.equal(lora_B[:, :3], (source.float() * (7 / 3) / 2.0).to(torch.bfloat16))


def test_export_refuses_ranks_above_what_vllm_or_the_user_allows(tmp_path):
    big = _write_adapter(tmp_path / "big", {"rank_pattern": {"q_proj": 600}}, _pair("model.q_proj", 600))
    with pytest.raises(AdapterExportError, match="largest module rank is 600, above vLLM's largest max_lora_rank 512"):
        export_for_vllm(big, tmp_path / "out_big")
    middle = _write_adapter(tmp_path / "middle", {"rank_pattern": {"q_proj": 20}}, _pair("model.q_proj", 20))
    with pytest.raises(AdapterExportError, match="largest module rank is 20, above max_lora_rank 16"):
        export_for_vllm(middle, tmp_path / "out_middle", max_lora_rank=16)
    with pytest.raises(AdapterExportError, match="max_lora_rank 24 is not one vLLM accepts"):
        export_for_vllm(middle, tmp_path / "out_middle", max_lora_rank=24)
    assert not (tmp_path / "out_big").exists() and not (tmp_path / "out_middle").exists()
    export_for_vllm(middle, tmp_path / "out_ok")
    assert json.loads((tmp_path / "out_ok" / CONFIG).read_text())["r"] == 32


@pytest.mark.parametrize(
    "config, message",
    [
        ({"use_dora": True}, "DoRA"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"bias": "all"}, "trained biases"),
        ({"init_lora_weights": "pissa_niter_4"}, "base model PEFT modified"),
        ({"peft_type": "ADALORA"}, "ADALORA adapter"),
        ({"rank_pattern": {"q_proj": 5}}, "rank 3 in its weights but 5"),
    ],
)
def test_export_refuses_adapters_that_are_not_plain_lora(tmp_path, config, message):
    adapter = _write_adapter(tmp_path / "adapter", config, _pair("model.q_proj", 3))
    with pytest.raises(AdapterExportError, match=message):
        export_for_vllm(adapter, tmp_path / "out")


def test_export_refuses_other_tensors_and_pickled_weights(tmp_path):
    tensors = {**_pair("model.q_proj", 3), "base_model.model.model.q_proj.lora_magnitude_vector": torch.ones(4)}
    adapter = _write_adapter(tmp_path / "dora", {}, tensors)
    with pytest.raises(AdapterExportError, match="lora_magnitude_vector .* is not the 2-D lora_A / lora_B weight"):
        export_for_vllm(adapter, tmp_path / "out")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / CONFIG).write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    (pickled / "adapter_model.bin").write_bytes(b"not read")
    with pytest.raises(AdapterExportError, match="no adapter_model.safetensors .*safe_serialization=True"):
        export_for_vllm(pickled, tmp_path / "out")


def test_vllm_compatibility_rules(tmp_path):
    patterned = _write_adapter(
        tmp_path / "patterned", {"rank_pattern": {"q_proj": 6}, "alpha_pattern": {"q_proj": 3}},
        _pair("model.layers.0.self_attn.q_proj", 6),
    )
    with pytest.raises(VLLMCompatibilityError, match="rank_pattern is ignored by vLLM.*alpha_pattern is ignored"):
        check_vllm_compatible(patterned, 8)
    export_for_vllm(patterned, tmp_path / "plain")
    check_vllm_compatible(tmp_path / "plain", 8, LLAMA_LORA_MODULES)  # passes: r 8 <= 8, Llama module names
    with pytest.raises(VLLMCompatibilityError, match="max_lora_rank 24 is not one of"):
        check_vllm_compatible(tmp_path / "plain", 24)
    with pytest.raises(VLLMCompatibilityError, match="LoRA rank 8 is greater than max_lora_rank 1"):
        check_vllm_compatible(tmp_path / "plain", 1)
    with pytest.raises(VLLMCompatibilityError, match="model.layers.0.self_attn.q_proj is not one of the model's"):
        check_vllm_compatible(tmp_path / "plain", 8, ["o_proj"])
    dora = _write_adapter(tmp_path / "dora", {"use_dora": True, "r": 3}, _pair("model.q_proj", 3))
    with pytest.raises(VLLMCompatibilityError, match="DoRA"):
        check_vllm_compatible(dora, 8)
    wide = _write_adapter(tmp_path / "wide", {"r": 8}, _pair("model.q_proj", 20))
    with pytest.raises(VLLMCompatibilityError, match="lora_A.weight has rank 20 > max_lora_rank 16"):
        check_vllm_compatible(wide, 16)
    assert VLLM_MAX_LORA_RANKS == (1, 8, 16, 32, 64, 128, 256, 320, 512)


def test_export_command_line(tmp_path, capsys):
    adapter = _write_adapter(tmp_path / "adapter", {"rank_pattern": {"q_proj": 6}}, _pair("model.q_proj", 6))
    main([str(adapter), str(tmp_path / "out"), "--max_lora_rank", "64"])
    exported = json.loads((tmp_path / "out" / CONFIG).read_text())
    assert (exported["r"], exported["lora_alpha"]) == (64, 128)
    assert math.isclose(json.loads((tmp_path / "out" / "tlora_vllm_export.json").read_text())["scaling"], 2.0)
    with pytest.raises(SystemExit) as stopped:
        main([str(adapter), str(tmp_path / "out2"), "--max_lora_rank", "1"])
    assert stopped.value.code == 2
    assert "largest module rank is 6, above max_lora_rank 1" in capsys.readouterr().err
