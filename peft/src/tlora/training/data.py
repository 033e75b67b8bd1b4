"""Training data (rows read by `tlora.data.rows`): check their fields, build the Alpaca prompt, tokenize, pad, draw the calibration set.

A generation example is `prompt + response + "\\n"` tokenized in one piece, followed by the EOS token *id* (appended
as a token, never as text, so no tokenizer can split or drop it). Labels are the input ids with every token that
starts inside the prompt set to -100, so the loss covers the response, the newline and EOS only. Examples are cut at
`cutoff_len` tokens (EOS is lost when the response is cut); examples left without any label token are dropped.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from ..data.prompts import format_prompt
from ..data.rows import DataFormatError, RowSource

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
_TOKENIZE_CHUNK = 1024


def _fields_present(row: Any) -> str:
    return str(sorted(row)) if isinstance(row, Mapping) else f"none (the row is a {type(row).__name__}, not an object)"


def require_text_fields(source: RowSource, required: Sequence[str], optional: Sequence[str] = ()) -> None:
    """Raise `DataFormatError` at the first row that lacks a required field or has a non-text value."""
    for index, row in enumerate(source.rows):
        if not isinstance(row, Mapping):
            raise DataFormatError(
                f"{source.where(index)} is a {type(row).__name__}, not an object with fields {list(required)}"
            )
        for name in required:
            if name not in row:
                raise DataFormatError(
                    f"{source.where(index)} lacks field {name!r} (fields present: {_fields_present(row)}); pass "
                    "--dataset_field with the names this data uses"
                )
            if not isinstance(row[name], str):
                raise DataFormatError(
                    f"{source.where(index)}: field {name!r} is {type(row[name]).__name__} {row[name]!r:.60}, expected "
                    f"text (fields present: {_fields_present(row)})"
                )
        for name in optional:
            if row.get(name) is not None and not isinstance(row[name], str):
                raise DataFormatError(
                    f"{source.where(index)}: field {name!r} is {type(row[name]).__name__}, expected text or absent"
                )


# ---------------------------------------------------------------------------------------------------------------
# Tokenized datasets
# ---------------------------------------------------------------------------------------------------------------


class ExampleDataset(torch.utils.data.Dataset):
    """Tokenized examples (dicts of int lists) and, for each, the index of its row in the source."""

    def __init__(self, examples: list[dict[str, Any]], source_rows: list[int]):
        self.examples = examples
        self.source_rows = source_rows

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.examples[index]


def _progress(total: int, description: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="rows", disable=not enabled)


def eos_token_id(tokenizer) -> int:
    """The tokenizer's EOS id; an error if it has none."""
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer {type(tokenizer).__name__} has no EOS token; training needs one")
    return int(tokenizer.eos_token_id)


def _appends_eos_itself(tokenizer) -> bool:
    """True when the tokenizer's post-processor already ends every sequence with EOS."""
    ids = tokenizer("x", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[-1] == tokenizer.eos_token_id


def _prompt_token_count(offsets: Sequence[tuple[int, int]], prompt_chars: int) -> int:
    """Tokens that start inside the prompt (leading special tokens included): the ones masked out of the labels."""
    for index, (start, end) in enumerate(offsets):
        if end > start and start >= prompt_chars:
            return index
    return len(offsets)


def tokenize_instructions(
    tokenizer,
    prompts: Sequence[str],
    responses: Sequence[str],
    cutoff_len: int,
    *,
    show_progress: bool = False,
) -> list[dict[str, list[int]]]:
    """input_ids = tokens(prompt + response + "\\n") + [EOS]; labels = the same with the prompt's tokens at -100."""
    if cutoff_len <= 0:
        raise ValueError(f"--cutoff_len must be positive, got {cutoff_len}")
    eos = eos_token_id(tokenizer)
    append_eos = not _appends_eos_itself(tokenizer)
    use_offsets = bool(getattr(tokenizer, "is_fast", False))
    examples = []
    with _progress(len(prompts), "Tokenizing", show_progress) as progress:
        for start in range(0, len(prompts), _TOKENIZE_CHUNK):
            chunk_prompts = list(prompts[start : start + _TOKENIZE_CHUNK])
            texts = [p + r + "\n" for p, r in zip(chunk_prompts, responses[start : start + _TOKENIZE_CHUNK])]
            encoded = tokenizer(texts, add_special_tokens=True, return_offsets_mapping=use_offsets)
            if not use_offsets:
                prompt_lengths = [len(ids) for ids in tokenizer(chunk_prompts, add_special_tokens=True)["input_ids"]]
            for index, ids in enumerate(encoded["input_ids"]):
                ids = list(ids) + ([eos] if append_eos else [])
                if use_offsets:
                    masked = _prompt_token_count(encoded["offset_mapping"][index], len(chunk_prompts[index]))
                else:
                    masked = prompt_lengths[index]
                labels = [IGNORE_INDEX] * masked + ids[masked:]
                examples.append({"input_ids": ids[:cutoff_len], "labels": labels[:cutoff_len]})
            progress.update(len(chunk_prompts))
    return examples


@dataclass
class InstructionFields:
    """Which row fields hold the instruction, the response and (optionally) the extra input."""

    instruction: str
    response: str
    input: Optional[str] = None

    @classmethod
    def from_arguments(cls, dataset_field: Sequence[str], input_field: Optional[str]) -> "InstructionFields":
        if len(dataset_field) != 2:
            raise ValueError(
                f"--dataset_field takes two names, the instruction and the response field; got {list(dataset_field)}"
            )
        return cls(dataset_field[0], dataset_field[1], input_field or None)


def build_instruction_dataset(
    source: RowSource,
    fields: InstructionFields,
    tokenizer,
    cutoff_len: int,
    *,
    show_progress: bool = False,
    allow_empty: bool = False,
) -> ExampleDataset:
    """Check the rows, build Alpaca prompts and tokenize; examples without any label token are dropped (an error when
    none is left, unless `allow_empty`)."""
    require_text_fields(source, [fields.instruction, fields.response], [fields.input] if fields.input else [])
    prompts, responses = [], []
    for row in source.rows:
        context = row.get(fields.input) if fields.input else None
        prompts.append(format_prompt(row[fields.instruction], context))
        responses.append(row[fields.response])
    examples = tokenize_instructions(tokenizer, prompts, responses, cutoff_len, show_progress=show_progress)
    kept, rows, dropped, truncated = [], [], [], 0
    eos = eos_token_id(tokenizer)
    for index, example in enumerate(examples):
        if example["input_ids"][-1] != eos:
            truncated += 1
        if all(label == IGNORE_INDEX for label in example["labels"]):
            dropped.append(source.row_number(index))
            continue
        kept.append(example)
        rows.append(source.row_number(index))
    if truncated:
        logger.warning("%d of %d examples were cut at --cutoff_len %d (their EOS is lost).", truncated, len(examples), cutoff_len)
    if dropped:
        logger.warning(
            "Dropped %d examples whose prompt fills --cutoff_len %d (no response token left), rows %s%s.",
            len(dropped), cutoff_len, dropped[:10], "..." if len(dropped) > 10 else "",
        )
    if not kept and not allow_empty:
        raise DataFormatError(f"{source.origin}: no example keeps a response token within --cutoff_len {cutoff_len}")
    return ExampleDataset(kept, rows)


@dataclass
class ClassificationFields:
    """Which row fields hold the text, the optional second text of a pair, and the label."""

    text: str
    label: str
    text_pair: Optional[str] = None

    @classmethod
    def from_arguments(cls, dataset_field: Sequence[str]) -> "ClassificationFields":
        if len(dataset_field) == 2:
            return cls(dataset_field[0], dataset_field[1])
        if len(dataset_field) == 3:
            return cls(dataset_field[0], dataset_field[2], dataset_field[1])
        raise ValueError(
            "nlu_train.py takes --dataset_field TEXT LABEL or --dataset_field TEXT TEXT_PAIR LABEL; got "
            f"{list(dataset_field)}"
        )


def label_names(source: RowSource, field_name: str) -> list[Any]:
    """The distinct labels of a classification source: 0..K-1 for integer labels, sorted names otherwise."""
    for index, row in enumerate(source.rows):
        if not isinstance(row, Mapping) or field_name not in row:
            raise DataFormatError(
                f"{source.where(index)} lacks label field {field_name!r} (fields present: {_fields_present(row)})"
            )
        value = row[field_name]
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise DataFormatError(
                f"{source.where(index)}: label {field_name!r} is {type(value).__name__} {value!r:.40}; expected an "
                "integer class id or a class name"
            )
    values = {row[field_name] for row in source.rows}
    if all(isinstance(v, int) for v in values):
        if min(values) < 0:
            raise DataFormatError(f"{source.origin}: integer labels must be >= 0, found {min(values)}")
        return list(range(max(values) + 1))
    if any(isinstance(v, int) for v in values):
        raise DataFormatError(f"{source.origin}: label field {field_name!r} mixes integers and names")
    return sorted(values)


def build_classification_dataset(
    source: RowSource,
    fields: ClassificationFields,
    tokenizer,
    cutoff_len: int,
    labels: Sequence[Any],
    *,
    show_progress: bool = False,
    allow_empty: bool = False,
) -> ExampleDataset:
    """Tokenize text (or text pairs) with truncation at `cutoff_len`; labels become class ids (no row is dropped, so
    `allow_empty` only mirrors `build_instruction_dataset`)."""
    require_text_fields(source, [fields.text] + ([fields.text_pair] if fields.text_pair else []))
    label_ids = {label: index for index, label in enumerate(labels)}
    examples = []
    with _progress(len(source.rows), "Tokenizing", show_progress) as progress:
        for start in range(0, len(source.rows), _TOKENIZE_CHUNK):
            chunk = source.rows[start : start + _TOKENIZE_CHUNK]
            texts = [row[fields.text] for row in chunk]
            pairs = [row[fields.text_pair] for row in chunk] if fields.text_pair else None
            encoded = tokenizer(texts, pairs, truncation=True, max_length=cutoff_len)
            for offset, (ids, row) in enumerate(zip(encoded["input_ids"], chunk)):
                label = row[fields.label]
                if label not in label_ids:
                    raise DataFormatError(
                        f"{source.where(start + offset)}: label {label!r} is not one of the training labels {list(labels)}"
                    )
                examples.append({"input_ids": list(ids), "labels": label_ids[label]})
            progress.update(len(chunk))
    return ExampleDataset(examples, [source.row_number(index) for index in range(len(examples))])


# ---------------------------------------------------------------------------------------------------------------
# Batching and calibration
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class PaddingCollator:
    """Right-pads input_ids (pad id), attention_mask (0) and token labels (-100); class labels stack as-is."""

    pad_token_id: int
    pad_to_multiple_of: Optional[int] = None
    label_pad_id: int = IGNORE_INDEX

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(features), longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(features), longest), dtype=torch.long)
        token_labels = isinstance(features[0].get("labels"), (list, tuple))
        labels = torch.full((len(features), longest), self.label_pad_id, dtype=torch.long) if token_labels else None
        for row, feature in enumerate(features):
            length = len(feature["input_ids"])
            input_ids[row, :length] = torch.tensor(feature["input_ids"], dtype=torch.long)
            attention_mask[row, :length] = 1
            if token_labels:
                labels[row, :length] = torch.tensor(feature["labels"], dtype=torch.long)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_labels:
            batch["labels"] = labels
        elif "labels" in features[0]:
            batch["labels"] = torch.tensor([f["labels"] for f in features], dtype=torch.long)
        return batch


CALIBRATION_DRAWS = ("dataset", "training_set")


def calibration_indices(num_examples: int, num_samples: int, seed: int) -> list[int]:
    """The first `num_samples` positions of `numpy.random.default_rng(seed).permutation(num_examples)`: the rows that
    `datasets.Dataset.shuffle(seed=seed).select(range(num_samples))` picks."""
    if num_samples > num_examples:
        logger.warning("--calibration_samples %d exceeds the %d rows to draw from; calibrating on all of them.", num_samples, num_examples)
    permutation = np.random.default_rng(seed).permutation(num_examples)
    return [int(i) for i in permutation[: min(num_samples, num_examples)]]


@dataclass
class CalibrationSet:
    """The calibration samples shared by all data-driven methods, and how they were drawn."""

    dataset: ExampleDataset
    indices: list[int]
    seed: int
    collator: PaddingCollator
    source_rows: list[int] = field(default_factory=list)
    draw: str = "training_set"
    population: int = 0

    def loader(self, batch_size: int) -> torch.utils.data.DataLoader:
        """The calibration samples in draw order, in batches (the same on every rank), padded only to the longest
        sample of the batch: a batch of one holds no padding at all, whatever the training collator rounds to."""
        subset = torch.utils.data.Subset(self.dataset, self.indices)
        collator = self.collator
        if dataclasses.is_dataclass(collator) and getattr(collator, "pad_to_multiple_of", None):
            collator = dataclasses.replace(collator, pad_to_multiple_of=None)  # any other collator is used as given
        return torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False, collate_fn=collator)

    def record(self) -> dict[str, Any]:
        """How the samples were drawn, for the run record."""
        return {
            "draw": self.draw,
            "seed": self.seed,
            "population": self.population,
            "num_samples": len(self.indices),
            "indices": self.source_rows if self.draw == "dataset" else self.indices,  # positions in the population
            "source_rows": self.source_rows,
        }


def draw_calibration_set(dataset: ExampleDataset, num_samples: int, seed: int, collator: PaddingCollator) -> CalibrationSet:
    """The 'training_set' draw: the tokenized training examples shuffled with `seed`, the first `num_samples` taken."""
    indices = calibration_indices(len(dataset), num_samples, seed)
    return CalibrationSet(dataset, indices, seed, collator, [dataset.source_rows[i] for i in indices], "training_set", len(dataset))


def draw_calibration_rows(
    source: RowSource,
    build: Callable[..., ExampleDataset],
    num_samples: int,
    seed: int,
    collator: PaddingCollator,
) -> CalibrationSet:
    """The 'dataset' draw, the authors' `load_dataset(...).shuffle(seed).select(range(N))`: every row of the file or
    split (before --max_samples) permuted with `seed`, the first `num_samples` rows tokenized by `build` like training
    rows. A row that keeps no response token within the cut-off is skipped for the next row of the permutation."""
    order = calibration_indices(source.full_size, source.full_size, seed)
    examples: list[dict[str, Any]] = []
    rows: list[int] = []
    start = 0
    while len(examples) < num_samples and start < len(order):
        chunk = order[start : start + num_samples - len(examples)]
        start += len(chunk)
        built = build(source.take(chunk), allow_empty=True)
        examples.extend(built.examples)
        rows.extend(built.source_rows)
    if len(examples) < num_samples:
        logger.warning("--calibration_samples %d: only %d usable rows in %s.", num_samples, len(examples), source.origin)
    if not examples:
        raise DataFormatError(f"{source.origin}: no row keeps a response token for calibration")
    skipped = sorted(set(order[:start]) - set(rows))
    if skipped:
        logger.warning("Calibration skipped rows %s (no response token within the cut-off) for the next ones.", skipped[:10])
    dataset = ExampleDataset(examples, rows)
    return CalibrationSet(dataset, list(range(len(examples))), seed, collator, rows, "dataset", source.full_size)
