"""`--model PATH` resolution and loading: merged directories, adapters merged on the fly, hub ids, clear errors."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from tlora.evaluation.models import (
    ModelResolutionError,
    load_model_and_tokenizer,
    merged_model_dir,
    resolve_model,
)

PROMPT = "Below is an instruction. 12 + 30 = ?"


def logits_of(model, tokenizer, text: str = PROMPT) -> torch.Tensor:
    """The model's logits for `text`."""
    inputs = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).logits


def test_merged_directory_resolves_as_merged(tiny_model_dir):
    resolved = resolve_model(str(tiny_model_dir))
    assert resolved.kind == "merged"
    assert resolved.path == str(tiny_model_dir)
    assert resolved.base_model is None and resolved.adapter_path is None


def test_adapter_directory_resolves_to_its_base_model(tiny_model_dir, tiny_adapter_dir):
    resolved = resolve_model(str(tiny_adapter_dir))
    assert resolved.kind == "adapter"
    assert resolved.adapter_path == str(tiny_adapter_dir)
    assert resolved.base_model == str(tiny_model_dir)


def test_hub_id_resolves_as_hub_without_network():
    resolved = resolve_model("meta-llama/Llama-2-7b-hf")
    assert (resolved.kind, resolved.path) == ("hub", "meta-llama/Llama-2-7b-hf")


def test_missing_local_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ModelResolutionError, match="not a model directory"):
        resolve_model(str(tmp_path / "no_such_run"))
    with pytest.raises(ModelResolutionError, match="neither adapter_config.json"):
        resolve_model(str(tmp_path))


def test_adapter_with_an_absent_base_model_asks_for_base_model(tmp_path, tiny_adapter_dir, tiny_model_dir):
    adapter = tmp_path / "moved_adapter"
    shutil.copytree(tiny_adapter_dir, adapter)
    config_path = adapter / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = "/nonexistent/llama"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelResolutionError, match="--base_model"):
        resolve_model(str(adapter))
    assert resolve_model(str(adapter), base_model=str(tiny_model_dir)).base_model == str(tiny_model_dir)


def test_adapter_folder_without_its_weights_is_a_clear_error(tmp_path, tiny_adapter_dir):
    adapter = tmp_path / "half_saved"
    shutil.copytree(tiny_adapter_dir, adapter)
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(ModelResolutionError, match=rf"{adapter} holds adapter_config.json but no adapter weights "
                       r"\(adapter_model.safetensors or adapter_model.bin\)"):
        resolve_model(str(adapter))


def test_a_missing_base_model_override_is_named(tmp_path, tiny_adapter_dir):
    missing = tmp_path / "no_such_base"
    with pytest.raises(ModelResolutionError, match=rf"--base_model {missing} is not a model folder on this machine"):
        resolve_model(str(tiny_adapter_dir), base_model=str(missing))
    assert resolve_model(str(tiny_adapter_dir), base_model="org/base").base_model == "org/base"


def test_merged_directory_loads_with_identical_logits(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir), device="cpu")
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not model.training
    torch.testing.assert_close(logits_of(model, tokenizer), logits_of(reference, tokenizer), rtol=0, atol=0)


def test_adapter_is_merged_and_matches_the_peft_model(tiny_model_dir, tiny_adapter_dir):
    from transformers import AutoModelForCausalLM

    from peft import PeftModel

    merged, tokenizer = load_model_and_tokenizer(str(tiny_adapter_dir), device="cpu")
    assert not any("lora" in name for name, _ in merged.named_parameters()), "the adapter must be merged away"
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tiny_adapter_dir)
    peft_model.eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    expected = logits_of(peft_model, tokenizer)
    torch.testing.assert_close(logits_of(merged, tokenizer), expected, rtol=1e-4, atol=1e-4)
    assert (logits_of(base, tokenizer) - expected).abs().max() > 1e-2, "the test adapter must change the outputs"


def test_tokenizer_comes_from_the_adapter_directory_when_it_has_one(tmp_path, tiny_adapter_dir):
    from tlora.fixtures.toy import byte_tokenizer

    adapter = tmp_path / "adapter_with_tokenizer"
    shutil.copytree(tiny_adapter_dir, adapter)
    tokenizer = byte_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<marker>"]})
    tokenizer.save_pretrained(adapter)
    model, loaded = load_model_and_tokenizer(str(adapter), device="cpu")
    assert "<marker>" in loaded.get_vocab()
    assert model.get_input_embeddings().weight.shape[0] >= len(loaded), "embeddings resized to the adapter tokenizer"


def test_merged_model_dir_writes_once_and_reuses(tmp_path, tiny_model_dir, tiny_adapter_dir):
    from transformers import AutoModelForCausalLM

    assert merged_model_dir(str(tiny_model_dir), str(tmp_path)) == str(tiny_model_dir)
    assert merged_model_dir("org/model", str(tmp_path)) == "org/model"
    first = merged_model_dir(str(tiny_adapter_dir), str(tmp_path / "work"))
    assert (tmp_path / "work").is_dir() and first.startswith(str(tmp_path / "work"))
    assert resolve_model(first).kind == "merged"
    written = AutoModelForCausalLM.from_pretrained(first)
    merged, tokenizer = load_model_and_tokenizer(str(tiny_adapter_dir), device="cpu")
    torch.testing.assert_close(logits_of(written, tokenizer), logits_of(merged, tokenizer), rtol=1e-5, atol=1e-5)
    modified = (tmp_path / "work").stat().st_mtime_ns
    assert merged_model_dir(str(tiny_adapter_dir), str(tmp_path / "work")) == first
    assert (tmp_path / "work").stat().st_mtime_ns == modified, "a second call reuses the merged copy"


def test_unknown_dtype_is_rejected(tiny_model_dir):
    with pytest.raises(ValueError, match="Unknown dtype"):
        load_model_and_tokenizer(str(tiny_model_dir), dtype="float8")


def test_merged_model_dir_reuses_the_merged_copy_written_by_training(tmp_path, tiny_adapter_dir, tiny_model_dir):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_adapter_dir, run_dir)
    shutil.copytree(tiny_model_dir, run_dir / "merged")  # what `--merge` leaves beside the adapter
    os.utime(run_dir / "adapter_model.safetensors", (1000, 1000))
    os.utime(run_dir / "merged" / "config.json", (2000, 2000))  # written after the adapter, as training does
    assert merged_model_dir(str(run_dir), str(tmp_path / "work")) == str(run_dir / "merged")
    assert not (tmp_path / "work").exists()
    os.utime(run_dir / "merged" / "config.json", (1, 1))  # older than the adapter: stale, so merged afresh
    assert merged_model_dir(str(run_dir), str(tmp_path / "work")).startswith(str(tmp_path / "work"))
