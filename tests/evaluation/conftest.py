"""Fixtures for the evaluation tests: a tiny saved model that writes printable ASCII, and a LoRA adapter on it."""

from __future__ import annotations

import pathlib

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def printable_tiny_llama(seed: int = 0):
    """The toy Llama with its output head limited to printable ASCII bytes (so generations are readable text)."""
    import torch
    from tlora.fixtures.toy import byte_tokenizer, tiny_llama

    tokenizer = byte_tokenizer()
    model = tiny_llama(seed=seed)
    printable = []
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        if len(text) == 1 and text.isascii() and text.isprintable():
            printable.append(token_id)
    keep = torch.zeros(model.lm_head.weight.shape[0], dtype=torch.bool)
    keep[printable] = True
    with torch.no_grad():
        model.lm_head.weight[~keep] = 0.0  # logit 0 for bytes that are not printable, and for EOS
        model.lm_head.weight[keep] *= 10.0  # a printable byte always has a larger positive logit
    return model, tokenizer


@pytest.fixture(scope="session")
def repo_root() -> pathlib.Path:
    """The checkout's root (where math/, commonsense/ and peft/ live)."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> pathlib.Path:
    """A saved tiny Llama (float32) with its byte tokenizer: a "merged model directory"."""
    model, tokenizer = printable_tiny_llama()
    directory = tmp_path_factory.mktemp("tiny_model")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_adapter_dir(tiny_model_dir, tmp_path_factory) -> pathlib.Path:
    """A LoRA adapter (non-zero B, so it changes the outputs) saved for the tiny model, without a tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    peft_model = get_peft_model(base, config)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    directory = tmp_path_factory.mktemp("tiny_adapter")
    peft_model.save_pretrained(directory)
    return directory
