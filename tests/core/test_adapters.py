"""What TLoRA saves is a standard LoRA adapter: stock PEFT loads it without tlora, and merging is exact."""

import json
import subprocess
import sys
import textwrap

import torch
from safetensors.torch import load_file

from conftest import LLAMA_TARGETS, pad_batches, trained_tlora
from tlora import TLoRAConfig, get_tlora_model, load_tlora_model
from tlora.config import exact_pattern_keys

STOCK_LOADER = textwrap.dedent(
    """
    import sys, torch
    from peft import PeftModel
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(sys.argv[1])
    model = PeftModel.from_pretrained(base, sys.argv[2]).eval()
    batch = load_file(sys.argv[3])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert "tlora" not in sys.modules, "stock PEFT must load the adapter without tlora"
    save_file({"logits": logits.contiguous()}, sys.argv[4])
    """
)


def test_saved_adapter_is_plain_lora_and_loads_in_stock_peft(llama, samples, tmp_path):
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    llama.save_pretrained(base_dir)
    model = trained_tlora(llama, samples)
    model.save_pretrained(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    plan = model.base_model.tlora_plan()
    assert config["peft_type"] == "LORA"
    assert config["rank_pattern"] == exact_pattern_keys(plan.rank_pattern())
    assert config["alpha_pattern"] == exact_pattern_keys(plan.alpha_pattern())
    assert sorted(config["target_modules"]) == sorted(plan.target_modules())
    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    assert any("lora_A" in key for key in weights) and any("lora_B" in key for key in weights)
    assert not any(key.endswith(".bin") for key in map(str, adapter_dir.iterdir()))

    batch = pad_batches(samples, 6)[0]
    from safetensors.torch import save_file

    save_file({k: batch[k].contiguous() for k in ("input_ids", "attention_mask")}, str(tmp_path / "batch.safetensors"))
    with torch.no_grad():
        expected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    script = tmp_path / "stock_loader.py"
    script.write_text(STOCK_LOADER)
    subprocess.run(
        [sys.executable, str(script), str(base_dir), str(adapter_dir), str(tmp_path / "batch.safetensors"),
         str(tmp_path / "logits.safetensors")],
        check=True,
        cwd=tmp_path,
    )
    logits = load_file(str(tmp_path / "logits.safetensors"))["logits"]
    assert torch.allclose(logits, expected, atol=1e-6, rtol=0)


def test_merge_and_unload_gives_the_same_logits(llama, samples):
    model = trained_tlora(llama, samples)
    batch = pad_batches(samples, 6)[0]
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        expected = model(**inputs).logits
        with model.disable_adapter():
            base_logits = model(**inputs).logits
        merged = model.merge_and_unload()
        logits = merged(**inputs).logits
    assert not torch.allclose(expected, base_logits, atol=1e-4)  # the adapter matters
    assert torch.allclose(logits, expected, atol=1e-5, rtol=1e-5)
    assert not any("lora" in name for name, _ in merged.named_parameters())


def test_get_tlora_model_leaves_outputs_unchanged(llama, samples):
    batch = pad_batches(samples, 6)[0]
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        before = llama(**inputs).logits.clone()
    config = TLoRAConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, task_type="CAUSAL_LM")
    model = get_tlora_model(llama, config, pad_batches(samples, 3), show_progress=False)
    with torch.no_grad():
        after = model(**inputs).logits
    assert torch.equal(before, after)


def test_load_tlora_model_refuses_a_folder_without_its_plan(llama, samples, tmp_path):
    import pytest

    from tlora.outputs import AdapterFolderError
    from tlora.fixtures.toy import tiny_llama

    trained_tlora(llama, samples).save_pretrained(tmp_path)  # the adapter alone, no tlora_plan.json beside it
    base = tiny_llama(hidden_size=32, num_layers=2, intermediate_size=48, num_heads=4, seed=0)
    with pytest.raises(AdapterFolderError, match=r"has no tlora_plan.json, so it is not a TLoRA adapter folder .*"
                       r"peft.PeftModel.from_pretrained\(model, "):
        load_tlora_model(base, tmp_path, is_trainable=True)
