"""Tiny, offline building blocks for the demo and the tests: a byte-level tokenizer and a small Llama."""

from __future__ import annotations

from typing import Optional

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")


def byte_tokenizer():
    """A byte-level BPE tokenizer without merges (260 tokens) built in memory; needs no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocabulary = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for character in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocabulary[character] = len(vocabulary)
    tokenizer = Tokenizer(models.BPE(vocab=vocabulary, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocabulary["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="right",
    )


def tiny_llama(
    vocab_size: int = 260,
    hidden_size: int = 64,
    num_layers: int = 2,
    intermediate_size: Optional[int] = None,
    num_heads: int = 4,
    num_key_value_heads: Optional[int] = None,
    max_position_embeddings: int = 512,
    seed: int = 0,
    dtype=None,
):
    """A randomly initialised LlamaForCausalLM with all seven projections, built from a config (no download)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or int(hidden_size * 8 / 3 // 8 * 8),
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_key_value_heads or num_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if dtype is not None:
        model = model.to(dtype)
    return model


def package_text(name: str) -> str:
    """The text of a data file shipped inside the package (`data/...`)."""
    from importlib import resources

    return resources.files("tlora").joinpath(name).read_text()


def pretrain_on_package_text(model, tokenizer, steps: int, seed: int = 0) -> float:
    """A few full language-model steps on the packaged non-arithmetic samples; returns the last loss."""
    import json

    import torch

    texts = [json.loads(line)["text"] for line in package_text("data/sample_nlu.jsonl").splitlines() if line.strip()]
    texts += [" ".join(filter(None, (row["instruction"], row.get("input"), row["output"])))
              for row in json.loads(package_text("data/sample_commonsense.json"))]
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        chosen = torch.randint(0, len(texts), (8,), generator=generator).tolist()
        batch = tokenizer([texts[i] for i in chosen], padding=True, truncation=True, max_length=128, return_tensors="pt")
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return float(loss.detach())
