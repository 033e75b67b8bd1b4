"""Fixtures for the core tests: a tiny Llama, an offline byte tokenizer and padded calibration batches."""

import random

import pytest
import torch

from tlora.fixtures.toy import byte_tokenizer, tiny_llama

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

PAIRS = [
    ("What is 3 + 4?", "3 + 4 = 7. The answer is: 7"),
    ("Tom has 12 apples and eats 5. How many are left?", "12 - 5 = 7. The answer is: 7"),
    ("Double 21.", "The answer is: 42"),
    ("A box holds 6 rows of 8 eggs. How many eggs are in 3 boxes?", "6 * 8 = 48 per box, 48 * 3 = 144. The answer is: 144"),
    ("Halve 90, then add 5.", "90 / 2 = 45 and 45 + 5 = 50. The answer is: 50"),
    ("Sum 1, 2 and 3.", "6. The answer is: 6"),
]


def make_samples(tokenizer, pairs=PAIRS):
    """Unpadded samples: prompt tokens masked to -100 in the labels, response followed by EOS."""
    samples = []
    for question, answer in pairs:
        prompt = tokenizer(f"### Instruction:\n{question}\n\n### Response:")["input_ids"]
        response = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor(prompt + response)
        labels = ids.clone()
        labels[: len(prompt)] = -100
        samples.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return samples


def pad_batches(samples, batch_size, pad_id=0, side="right"):
    """Batches of right-padded samples (labels padded with -100)."""
    batches = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        length = max(len(s["input_ids"]) for s in chunk)
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for s in chunk:
            pad = length - len(s["input_ids"])
            for key, value in (("input_ids", pad_id), ("attention_mask", 0), ("labels", -100)):
                filler = torch.full((pad,), value, dtype=s[key].dtype)
                parts = [s[key], filler] if side == "right" else [filler, s[key]]
                batch[key].append(torch.cat(parts))
        batches.append({k: torch.stack(v) for k, v in batch.items()})
    return batches


class CountingBatches:
    """Batches that count how many were taken from them."""

    def __init__(self, batches):
        self.batches, self.taken = batches, 0

    def __iter__(self):
        for batch in self.batches:
            self.taken += 1
            yield batch


@pytest.fixture(scope="session")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="session")
def samples(tokenizer):
    return make_samples(tokenizer)


@pytest.fixture
def llama():
    return tiny_llama(hidden_size=32, num_layers=2, intermediate_size=48, num_heads=4, seed=0)


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    torch.manual_seed(0)


def trained_tlora(llama, samples, max_rank=None):
    """A TLoRA model on `llama` (r = 4, alpha = 8, modules of different ranks and scales) whose every B is random and
    non-zero, standing in for training so that the adapter changes the outputs."""
    from tlora import TLoRAConfig, get_tlora_model

    config = TLoRAConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, task_type="CAUSAL_LM", max_rank=max_rank)
    model = get_tlora_model(llama, config, pad_batches(samples, 3), show_progress=False)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model.eval()
