"""The data pipeline: Alpaca prompt, masking, EOS placement, truncation, padding, calibration draw, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tlora.data.prompts import format_prompt
from tlora.data.rows import DataFormatError, load_rows
from tlora.training.data import (
    IGNORE_INDEX,
    InstructionFields,
    PaddingCollator,
    build_instruction_dataset,
    calibration_indices,
    draw_calibration_set,
    tokenize_instructions,
)
from training_helpers import SAMPLE_COMMONSENSE, SAMPLE_MATH, SAMPLE_NLU


def split_example(tokenizer, example):
    """(text of the masked prompt tokens, text of the label tokens, the label ids)."""
    ids, labels = example["input_ids"], example["labels"]
    masked = [i for i, label in zip(ids, labels) if label == IGNORE_INDEX]
    targets = [label for label in labels if label != IGNORE_INDEX]
    return tokenizer.decode(masked, skip_special_tokens=True), targets


def assert_prompt_masked_and_eos_last(tokenizer, example, prompt, response):
    """Labels hold exactly the tokens of response + '\\n' followed by the EOS id; the prompt is masked."""
    masked_text, targets = split_example(tokenizer, example)
    assert masked_text == prompt
    assert example["input_ids"][0] == tokenizer.bos_token_id and example["labels"][0] == IGNORE_INDEX
    assert targets[-1] == tokenizer.eos_token_id
    assert tokenizer.eos_token_id not in targets[:-1]
    assert tokenizer.decode(targets[:-1]) == response + "\n"
    assert example["input_ids"][-1] == tokenizer.eos_token_id
    assert len(example["input_ids"]) == len(example["labels"])


def test_math_rows_mask_the_prompt_and_end_with_newline_then_eos(byte_tokenizer):
    source = load_rows(str(SAMPLE_MATH))
    dataset = build_instruction_dataset(source, InstructionFields("query", "response"), byte_tokenizer, 512)
    assert len(dataset) == len(source.rows) == 64
    for row, example in zip(source.rows[:8], dataset.examples[:8]):
        assert row["response"].endswith(row["response"].split("The answer is: ")[-1])
        assert_prompt_masked_and_eos_last(byte_tokenizer, example, format_prompt(row["query"]), row["response"])


def test_real_gsm8k_rows_through_dataset_field(shared_data, byte_tokenizer):
    source = load_rows(str(shared_data / "gsm8k" / "test.jsonl"), max_samples=20)
    fields = InstructionFields.from_arguments(["question", "answer"], None)
    dataset = build_instruction_dataset(source, fields, byte_tokenizer, 4096)
    for row, example in zip(source.rows, dataset.examples):
        assert_prompt_masked_and_eos_last(byte_tokenizer, example, format_prompt(row["question"]), row["answer"])


def test_real_commonsense_rows_and_input_section(shared_data, byte_tokenizer):
    real = load_rows(str(shared_data / "commonsense" / "boolq" / "test.json"), max_samples=10)
    fields = InstructionFields.from_arguments(["instruction", "output"], "input")
    dataset = build_instruction_dataset(real, fields, byte_tokenizer, 4096)
    for row, example in zip(real.rows, dataset.examples):
        assert "### Input:" not in format_prompt(row["instruction"], row["input"])  # empty input: plain prompt
        assert_prompt_masked_and_eos_last(byte_tokenizer, example, format_prompt(row["instruction"]), row["output"])
    sample = load_rows(str(SAMPLE_COMMONSENSE))
    with_input = [row for row in sample.rows if row["input"]]
    assert with_input, "the shipped commonsense sample has rows with an input"
    dataset = build_instruction_dataset(sample, fields, byte_tokenizer, 4096)
    for row, example in zip(sample.rows, dataset.examples):
        prompt = format_prompt(row["instruction"], row["input"])
        assert ("### Input:\n" + row["input"] in prompt) == bool(row["input"])
        assert_prompt_masked_and_eos_last(byte_tokenizer, example, prompt, row["output"])


def metaspace_tokenizer():
    """A SentencePiece-like tokenizer (Metaspace '▁', BOS/EOS ids 1/2, character pieces) built in memory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    characters = sorted(set((SAMPLE_MATH.read_text() + format_prompt("x")).replace(" ", "")) | {"▁"})
    vocabulary = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for character in characters:
        vocabulary.setdefault(character, len(vocabulary))
    merges = [("▁", character) for character in characters if character != "▁"]
    for left, right in merges:
        vocabulary.setdefault(left + right, len(vocabulary))
    tokenizer = Tokenizer(models.BPE(vocab=vocabulary, merges=merges, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_masking_follows_character_offsets_for_a_sentencepiece_style_tokenizer():
    tokenizer = metaspace_tokenizer()
    source = load_rows(str(SAMPLE_MATH), max_samples=6)
    prompts = [format_prompt(row["query"]) for row in source.rows]
    responses = [" " + row["response"] for row in source.rows]  # a leading space merges into the first piece
    for prompt, response, example in zip(prompts, responses, tokenize_instructions(tokenizer, prompts, responses, 1024)):
        ids, labels = example["input_ids"], example["labels"]
        first_label = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
        # the first label token is the first token that starts at or after the end of the prompt text
        encoding = tokenizer(prompt + response + "\n", return_offsets_mapping=True)
        assert encoding["offset_mapping"][first_label][0] >= len(prompt)
        assert encoding["offset_mapping"][first_label - 1][0] < len(prompt)
        assert labels[-1] == tokenizer.eos_token_id == ids[-1]


def test_cutoff_truncates_and_drops_examples_without_response_tokens(byte_tokenizer, tmp_path, caplog):
    rows = [{"query": "short", "response": "ok"}, {"query": "x" * 400, "response": "lost"}, {"query": "q", "response": "y" * 300}]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    dataset = build_instruction_dataset(load_rows(str(path)), InstructionFields("query", "response"), byte_tokenizer, 256)
    assert dataset.source_rows == [0, 2]
    assert all(len(example["input_ids"]) <= 256 for example in dataset.examples)
    assert dataset.examples[0]["input_ids"][-1] == byte_tokenizer.eos_token_id
    assert dataset.examples[1]["input_ids"][-1] != byte_tokenizer.eos_token_id  # cut inside the response: no EOS
    assert "Dropped 1 examples" in caplog.text and "rows [1]" in caplog.text


def test_missing_field_names_file_row_and_fields_present(tmp_path, byte_tokenizer):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps({"query": "a", "response": "b"}) + "\n\n" + json.dumps({"question": "a", "answer": "b"}) + "\n")
    with pytest.raises(DataFormatError) as error:
        build_instruction_dataset(load_rows(str(path)), InstructionFields("query", "response"), byte_tokenizer, 64)
    message = str(error.value)
    assert str(path) in message and "line 3 (row 1)" in message
    assert "'query'" in message and "['answer', 'question']" in message and "--dataset_field" in message


def test_malformed_rows_give_errors_that_point_at_them(tmp_path):
    bad_line = tmp_path / "bad.jsonl"
    bad_line.write_text('{"query": "a", "response": "b"}\n{"query": "a", "response": \n')
    with pytest.raises(DataFormatError, match=r"bad\.jsonl, line 2 \(row 1\): not valid JSON"):
        load_rows(str(bad_line))
    not_text = tmp_path / "numbers.json"
    not_text.write_text(json.dumps([{"query": "a", "response": "b"}, {"query": "c", "response": 42}]))
    with pytest.raises(DataFormatError, match=r"numbers\.json, row 1: field 'response' is int 42, expected text"):
        build_instruction_dataset(load_rows(str(not_text)), InstructionFields("query", "response"), None, 64)
    not_object = tmp_path / "list.json"
    not_object.write_text(json.dumps([["query", "response"]]))
    with pytest.raises(DataFormatError, match=r"list\.json, row 0: expected a JSON object, got a list"):
        load_rows(str(not_object))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_rows(str(tmp_path / "missing.jsonl"))


def test_parquet_and_json_lines_in_a_json_file_are_read(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"query": "a", "response": "b"}, {"query": "c", "response": "d"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
    (tmp_path / "lines.json").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert load_rows(str(tmp_path / "rows.parquet")).rows == rows
    assert load_rows(str(tmp_path / "lines.json"), max_samples=1).rows == rows[:1]


def test_collator_right_pads_with_minus_100_labels_and_zero_mask():
    collator = PaddingCollator(pad_token_id=0)
    batch = collator([{"input_ids": [1, 5, 6], "labels": [-100, 5, 6]}, {"input_ids": [1, 7], "labels": [-100, 7]}])
    assert batch["input_ids"].tolist() == [[1, 5, 6], [1, 7, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, 5, 6], [-100, 7, -100]]
    classes = PaddingCollator(pad_token_id=0, pad_to_multiple_of=4)([{"input_ids": [1, 2], "labels": 1}])
    assert classes["input_ids"].shape == (1, 4) and classes["labels"].tolist() == [1]


def test_calibration_samples_are_the_first_rows_of_a_seeded_shuffle(byte_tokenizer):
    first = calibration_indices(100, 10, seed=7)
    assert first == calibration_indices(100, 10, seed=7)
    assert first == calibration_indices(100, 20, seed=7)[:10]  # a prefix of the same shuffle
    assert first != calibration_indices(100, 10, seed=8)
    assert len(set(first)) == 10
    assert sorted(calibration_indices(5, 10, seed=0)) == [0, 1, 2, 3, 4]
    dataset = build_instruction_dataset(load_rows(str(SAMPLE_MATH)), InstructionFields("query", "response"), byte_tokenizer, 512)
    calibration = draw_calibration_set(dataset, 6, 3, PaddingCollator(0))
    batches = list(calibration.loader(4))
    assert [b["input_ids"].shape[0] for b in batches] == [4, 2]
    expected = PaddingCollator(0)([dataset[i] for i in calibration.indices[:4]])
    assert torch.equal(batches[0]["input_ids"], expected["input_ids"])
    assert calibration.source_rows == [dataset.source_rows[i] for i in calibration.indices]


def test_classification_rows_map_labels_and_pairs(byte_tokenizer, tmp_path):
    from tlora.training.data import ClassificationFields, build_classification_dataset, label_names

    source = load_rows(str(SAMPLE_NLU))
    fields = ClassificationFields.from_arguments(["text", "label"])
    labels = label_names(source, "label")
    assert labels == [0, 1]
    dataset = build_classification_dataset(source, fields, byte_tokenizer, 16, labels)
    assert all(len(e["input_ids"]) <= 16 for e in dataset.examples)
    assert [e["labels"] for e in dataset.examples[:2]] == [row["label"] for row in source.rows[:2]]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"s1": f"a{i}", "s2": f"b{i}", "y": name}) + "\n" for i, name in enumerate(["no", "yes", "no"])))
    pair_source = load_rows(str(pairs))
    pair_fields = ClassificationFields.from_arguments(["s1", "s2", "y"])
    pair_labels = label_names(pair_source, "y")
    assert pair_labels == ["no", "yes"]
    pair_data = build_classification_dataset(pair_source, pair_fields, byte_tokenizer, 64, pair_labels)
    assert [e["labels"] for e in pair_data.examples] == [0, 1, 0]
    assert byte_tokenizer.decode(pair_data.examples[1]["input_ids"], skip_special_tokens=True) == "a1b1"
    with pytest.raises(DataFormatError, match="lacks label field 'label'"):
        label_names(pair_source, "label")


def write_numbered_rows(path, count: int):
    """`count` math rows whose query names their position."""
    path.write_text("".join(json.dumps({"query": f"question {i}", "response": f"answer {i}"}) + "\n" for i in range(count)))
    return path


def test_dataset_draw_takes_the_rows_of_the_authors_shuffle(tmp_path, byte_tokenizer):
    import datasets

    from tlora.training.arguments import DataArguments, MethodArguments
    from tlora.training.core import build_task_data, draw_calibration
    from training_helpers import load_task

    path = write_numbered_rows(tmp_path / "rows.jsonl", 300)
    data = build_task_data(
        load_task("math_train.py"), DataArguments(data_path=str(path), max_samples=100), byte_tokenizer, show_progress=False
    )
    assert len(data.train) == 100  # like the paper's first 100k of MetaMathQA's 395k rows
    calibration = draw_calibration(data, MethodArguments(calibration_samples=16, calibration_draw="dataset"), 42, PaddingCollator(0))
    # The authors' scripts: load_dataset("json", data_files=..., split="train").shuffle(seed=42).select(range(256))
    authors = datasets.Dataset.from_list(load_rows(str(path)).rows).shuffle(seed=42).select(range(16))
    assert [f"question {i}" for i in calibration.source_rows] == authors["query"]
    assert calibration.source_rows == [int(i) for i in np.random.default_rng(42).permutation(300)[:16]]
    assert any(row >= 100 for row in calibration.source_rows)  # rows outside the training subset, as theirs
    expected = build_instruction_dataset(load_rows(str(path)).take(calibration.source_rows), InstructionFields("query", "response"), byte_tokenizer, 512)
    assert [b["input_ids"][0].tolist() for b in calibration.loader(1)] == [e["input_ids"] for e in expected.examples]
    record = calibration.record()
    assert (record["draw"], record["seed"], record["population"], record["num_samples"]) == ("dataset", 42, 300, 16)
    assert record["indices"] == record["source_rows"] == calibration.source_rows
    subset = draw_calibration(data, MethodArguments(calibration_samples=16, calibration_draw="training_set"), 42, PaddingCollator(0))
    assert subset.record()["population"] == 100 and max(subset.source_rows) < 100


def test_authors_permutation_at_the_papers_size():
    import datasets

    rows = datasets.Dataset.from_dict({"row": list(range(395_000))})
    assert calibration_indices(395_000, 256, 42) == rows.shuffle(seed=42).select(range(256))["row"]


def test_dataset_draw_skips_rows_without_a_response_token(tmp_path, byte_tokenizer):
    from functools import partial

    from tlora.training.data import draw_calibration_rows

    rows = [{"query": "x" * (300 if i % 2 else 1), "response": "y"} for i in range(40)]
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows))
    build = partial(build_instruction_dataset, fields=InstructionFields("query", "response"), tokenizer=byte_tokenizer, cutoff_len=256)
    calibration = draw_calibration_rows(load_rows(str(path)), build, 8, 3, PaddingCollator(0))
    order = [int(i) for i in np.random.default_rng(3).permutation(40)]
    assert calibration.source_rows == [i for i in order if i % 2 == 0][:8]


def test_calibration_batches_are_never_padded_beyond_their_longest_sample(byte_tokenizer):
    dataset = build_instruction_dataset(load_rows(str(SAMPLE_MATH)), InstructionFields("query", "response"), byte_tokenizer, 512)
    calibration = draw_calibration_set(dataset, 6, 3, PaddingCollator(0, pad_to_multiple_of=64))
    for index, batch in zip(calibration.indices, calibration.loader(1)):
        assert batch["attention_mask"].all() and batch["input_ids"].shape[1] == len(dataset[index]["input_ids"])
