"""Fine-tuning runs on a real pretrained LLM, shared by the parts that train with the project's task scripts
("real", "tuned"): the held-out splits of the shared data, one run (the task script, then the scorer), the base model.

Data is never written into the repository: each part passes a temporary work folder.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from common import ALL_METHODS, METHOD_OPTIONS, REPO_ROOT

COMMONSENSE_TASKS = ("boolq", "piqa", "social_i_qa", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa")


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------


def shuffled_rows(rows: list, seed: int) -> list:
    """A copy of `rows` shuffled with `seed`."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """`rows` as a JSON-lines file (its folder created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def prepare_commonsense(data_dir: Path, work: Path, config: dict) -> dict[str, Any]:
    """Held-out `<work>/commonsense_test/<task>/test.json` per task and one mixed training file."""
    train, held_out = [], {}
    for task in COMMONSENSE_TASKS:
        rows = json.loads((data_dir / "commonsense" / task / "test.json").read_text())
        rows = shuffled_rows(rows, config["data_seed"])
        test = rows[: config["test_per_task"]]
        task_dir = work / "commonsense_test" / task
        task_dir.mkdir(parents=True, exist_ok=True)
        (task_dir / "test.json").write_text(json.dumps(test))
        held_out[task] = len(test)
        train += rows[config["test_per_task"] : config["test_per_task"] + config["train_per_task"]]
    train = shuffled_rows(train, config["data_seed"])
    write_jsonl(work / "commonsense_train.jsonl", train)
    return {"train_file": str(work / "commonsense_train.jsonl"), "test_dir": str(work / "commonsense_test"),
            "num_train": len(train), "num_test": held_out}


def math_training_row(row: dict) -> dict:
    """A MATH problem as a MetaMathQA-style row: the solution followed by `The answer is: <boxed answer>`."""
    from tlora.evaluation.math_answers import gold_answer

    return {"query": row["problem"], "response": f"{row['solution']}\nThe answer is: {gold_answer(row['solution'])}"}


def prepare_math(data_dir: Path, work: Path, config: dict) -> dict[str, Any]:
    """Held-out MATH rows (for the scorer, and as query/response rows for the held-out loss) and training rows."""
    rows = [json.loads(line) for line in (data_dir / "math" / "test.jsonl").read_text().splitlines() if line.strip()]
    rows = shuffled_rows(rows, config["data_seed"])
    test = rows[: config["math_test"]]
    train = rows[config["math_test"] : config["math_test"] + config["math_train"]]
    write_jsonl(work / "math_test.jsonl", test)
    write_jsonl(work / "math_heldout_loss.jsonl", [math_training_row(row) for row in test])
    write_jsonl(work / "math_train.jsonl", [math_training_row(row) for row in train])
    return {"train_file": str(work / "math_train.jsonl"), "test_file": str(work / "math_test.jsonl"),
            "loss_file": str(work / "math_heldout_loss.jsonl"), "num_train": len(train), "num_test": len(test)}


# ---------------------------------------------------------------------------------------------------------------
# One run: the task script, then the scorer
# ---------------------------------------------------------------------------------------------------------------


def training_command(task: str, method: str, seed: int, config: dict, data: dict, base_model: str, output_dir: Path,
                     device: str) -> list[str]:
    """The task script's command line for one run (every method gets the same options but its name and rank)."""
    core_method, factor = ALL_METHODS[method]
    r = max(1, int(round(config["r"] * factor)))
    alpha = config["lora_alpha"] * r / config["r"]
    script = "commonsense_train.py" if task == "commonsense" else "math_train.py"
    command = [
        sys.executable, str(REPO_ROOT / script), "--base_model", base_model, "--data_path", data["train_file"],
        "--method", core_method, "--lora_r", str(r), "--lora_alpha", f"{alpha:g}", "--seed", str(seed),
        "--output_dir", str(output_dir), "--max_steps", str(config["max_steps"]),
        "--per_device_train_batch_size", str(config["batch_size"]), "--global_batch_size", str(config["batch_size"]),
        "--per_device_eval_batch_size", str(config["batch_size"]),
        "--learning_rate", str(config["learning_rate"]), "--lr_scheduler_type", config["lr_scheduler_type"],
        "--warmup_steps", str(config["warmup_ratio"]), "--cutoff_len", str(config["cutoff_len"]),
        "--calibration_samples", str(config["calibration_samples"]),
        "--calibration_batch_size", str(config["calibration_batch_size"]),
        "--eva_max_passes", str(config["eva_max_passes"]),
        "--torch_dtype", "float32", "--bf16", "False", "--save_strategy", "no", "--logging_steps", "5",
        "--report_to", "none", "--disable_tqdm", "True",
    ]
    command += METHOD_OPTIONS.get(method, [])
    if device == "cpu":
        command += ["--use_cpu", "True"]
    splits = evaluation_files(task, data)
    if splits:
        command += ["--eval_split", ",".join(f"{name}={path}" if name else path for name, path in splits.items())]
    return command


def evaluation_files(task: str, data: dict) -> dict[str, str]:
    """The files the training process computes a held-out loss on: `data["loss_files"]` ({name: file}) when the part
    gives several, else the MATH held-out solutions (unnamed: the Trainer's plain `eval_loss`)."""
    if "loss_files" in data:
        return dict(data["loss_files"])
    return {"": data["loss_file"]} if task == "math" else {}


def evaluation_command(task: str, config: dict, data: dict, model_dir: Path, output: Path, device: str) -> list[str]:
    """The scorer's command line for one trained run (greedy, HF backend)."""
    common = ["--model", str(model_dir), "--backend", "hf", "--dtype", "float32", "--device", device,
              "--batch_size", str(config["eval_batch_size"]), "--output", str(output)]
    if task == "commonsense":
        return [sys.executable, str(REPO_ROOT / "commonsense" / "eval_commonsense.py"), *common,
                "--data_dir", data["test_dir"], "--tasks", ",".join(COMMONSENSE_TASKS),
                "--max_new_tokens", str(config["commonsense_max_new_tokens"])]
    # A held-out split of MATH, read with math-verify (the protocol the results so far were scored with): a subset,
    # which the result records.
    return [sys.executable, str(REPO_ROOT / "math" / "eval_math.py"), *common, "--data_file", data["test_file"],
            "--max_new_tokens", str(config["math_max_new_tokens"]), "--protocol", "robust", "--allow_subset"]


def _run_logged(command: list[str], log_path: Path, timeout_s: float, in_process: bool = False) -> float:
    """Run `command` with its output in `log_path` (or, for the smoke test, the script in this process); the wall
    time in seconds (a failure names the log)."""
    started = time.perf_counter()
    if in_process:
        import runpy

        saved = sys.argv
        sys.argv = command[1:]
        try:
            runpy.run_path(command[1], run_name="__main__")
        finally:
            sys.argv = saved
        return time.perf_counter() - started
    with open(log_path, "w") as log:
        completed = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s,
                                   env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if completed.returncode != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-25:])
        raise RuntimeError(f"{' '.join(command[:3])} ... failed (exit {completed.returncode}); log {log_path}:\n{tail}")
    return time.perf_counter() - started


def run_one(task: str, method: str, seed: int, config: dict, data: dict, base_model: str, work: Path,
            device: str, timeout_s: float, in_process: bool = False, score: bool = True,
            name: str | None = None, probe: Callable[[Path], dict] | None = None) -> dict:
    """Train one (task, method, seed) with `config`'s sizes and learning rate, then (with `score`) score it; the
    numbers from the run record (held-out losses included), the scorer's result and `probe(run folder)`, called
    before the folder is removed. `name` labels its logs."""
    name = name or f"{task}-{method}-{seed}"
    run_dir = work / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    train_s = _run_logged(training_command(task, method, seed, config, data, base_model, run_dir, device),
                          work / f"{name}.train.log", timeout_s, in_process)
    record = json.loads((run_dir / "run_record.json").read_text())
    out = {
        "task": task, "method": method, "seed": seed,
        "trainable_parameters": record["trainable_parameters"],
        "initialization_s": record["initialization_wall_time_s"],
        "calibration_s": record.get("calibration_wall_time_s", 0.0),
        "training_s": record["training_wall_time_s"],
        "train_loss": record["train_loss"],
        "global_step": record["global_step"],
        "training_process_s": round(train_s, 2),
    }
    metrics = record.get("eval_metrics") or {}
    for split in evaluation_files(task, data):
        out[f"{split}_loss" if split else "heldout_loss"] = metrics[f"eval_{split}_loss" if split else "eval_loss"]
    if score:
        result_path = work / f"{name}.eval.json"
        eval_s = _run_logged(evaluation_command(task, config, data, run_dir, result_path, device),
                             work / f"{name}.eval.log", timeout_s, in_process)
        scored = json.loads(result_path.read_text())
        out.update(evaluation_process_s=round(eval_s, 2), accuracy=scored["accuracy"], num_items=scored["num_items"])
        if task == "commonsense":
            out["per_task"] = {task_name: entry["accuracy"] for task_name, entry in scored["tasks"].items()}
    if probe is not None:
        out.update(probe(run_dir))
    shutil.rmtree(run_dir, ignore_errors=True)  # the adapter is not kept: only the numbers matter here
    return out


# ---------------------------------------------------------------------------------------------------------------
# The part
# ---------------------------------------------------------------------------------------------------------------


def base_model_path(scale: str, work: Path) -> str:
    """SmolLM2-135M-Instruct (full and quick sizes), or a tiny random Llama written to `work` (tiny: no wheel)."""
    if scale == "tiny":
        from tlora.fixtures.toy_model import write_toy_model

        return str(write_toy_model(work / "tiny-llama", hidden_size=32, num_layers=2))
    from tlora.demo.pretrained import smollm2_path

    return str(smollm2_path())


def chat_answer_loss(adapter_dir: Path, pairs: list[tuple[str, str]], cutoff_len: int, device: str) -> float:
    """The mean token loss of the answers of `pairs` (question, answer) written in the base model's own chat template
    (plain `question\n\nanswer` for a tokenizer without one), under the adapter in `adapter_dir` on its base model:
    general text in the format the model was instruction-tuned on, which the task runs never train on."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_path = json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).to(device)
    model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    total, count = 0.0, 0
    for question, answer in pairs:
        prompt_ids, full_ids = _chat_token_ids(tokenizer, question, answer)
        full_ids = full_ids[:cutoff_len]
        labels = [-100] * min(len(prompt_ids), len(full_ids)) + full_ids[len(prompt_ids):]
        if all(label == -100 for label in labels[1:]):
            continue
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([full_ids], device=device)).logits[0, :-1].float()
        targets = torch.tensor(labels[1:], device=device)
        losses = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
        total += float(losses)
        count += int((targets != -100).sum())
    return total / max(count, 1)


def _chat_token_ids(tokenizer, question: str, answer: str) -> tuple[list[int], list[int]]:
    """Token ids of the prompt alone and of prompt + answer, in the tokenizer's chat template when it has one."""
    if getattr(tokenizer, "chat_template", None):
        user = [{"role": "user", "content": question}]
        prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": answer}], tokenize=False)
    else:
        prompt, full = f"{question}\n\n", f"{question}\n\n{answer}"
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    return encode(prompt), encode(full)
