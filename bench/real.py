"""Part "real" — quality on a real pretrained LLM: SmolLM2-135M-Instruct fine-tuned with the project's own task
scripts (`commonsense_train.py`, `math_train.py`, i.e. `tlora.training`, the paper's code path) and scored with the
project's own scorers (`commonsense/eval_commonsense.py`, `math/eval_math.py`).

Methods: LoRA, LoRA at r/2, DoRA, PiSSA, CorDA (IPM), LoRA-GA, EVA and TLoRA, all at the same nominal r / alpha
(LoRA r/2 keeps alpha / r), the same data, optimizer steps, schedule and one learning rate (the rule: a single fixed
rate for every method, stated in the JSON; no per-method tuning).

Data (never written into the repository; a temporary folder per run of the part):

* commonsense — the seven LLM-Adapters test sets of ../shared/data/commonsense (boolq, piqa, social_i_qa,
  winogrande, ARC-Easy, ARC-Challenge, openbookqa) each shuffled with the data seed; the first `test_per_task` rows of
  each are held out for evaluation, the next `train_per_task` rows of all seven are mixed into one training file (as
  commonsense_170k mixes tasks; `instruction`/`input`/`output`, trained on `output`, scored on the answer word).
* math — ../shared/data/math/test.jsonl shuffled with the data seed; the first `math_test` problems are held out, the
  next `math_train` become training rows `query` = problem, `response` = solution + "\\nThe answer is: <boxed
  answer>" (MetaMathQA's format). Reported: the held-out loss of the solutions (the Trainer's eval_loss on the held-out
  rows) and MATH accuracy with the project's scorer (greedy, `math_max_new_tokens`).

Each (task, method, seed) is one training process and one evaluation process, run one at a time; the results file is
rewritten after every run and a rerun skips the runs already in it (delete `bench/results/real.json` to start over).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

from common import (ALL_METHODS, LABELS, Settings, calibrated, finetune_settings, fmt, markdown_table, mean,
                    part_header, std, target_check, targets_markdown, write_json)
from finetune import COMMONSENSE_TASKS, base_model_path, prepare_commonsense, prepare_math, run_one

PART = "real"
TASKS = ("commonsense", "math")


def sizes(scale: str) -> dict[str, Any]:
    """Hyper-parameters of the part (the same for every method)."""
    common = {"data_seed": 0, "lr_scheduler_type": "cosine", "warmup_ratio": 0.03, "eval_batch_size": 16}
    if scale == "tiny":
        return {**common, "r": 4, "lora_alpha": 4, "max_steps": 2, "batch_size": 2, "cutoff_len": 768,
                "learning_rate": 1e-3, "seeds": 1, "calibration_samples": 4, "calibration_batch_size": 2,
                "train_per_task": 4, "test_per_task": 2, "math_train": 8, "math_test": 3, "math_max_new_tokens": 8,
                "commonsense_max_new_tokens": 4, "eva_max_passes": 1}
    if scale == "quick":
        return {**common, "r": 8, "lora_alpha": 8, "max_steps": 4, "batch_size": 4, "cutoff_len": 128,
                "learning_rate": 5e-4, "seeds": 1, "calibration_samples": 8, "calibration_batch_size": 4,
                "train_per_task": 16, "test_per_task": 5, "math_train": 32, "math_test": 5, "math_max_new_tokens": 32,
                "commonsense_max_new_tokens": 6, "eva_max_passes": 2}
    # Sized for a quiet 2-core CPU machine: a run (training process, then scoring process) takes 2-3 minutes there,
    # the whole grid of 8 methods x 2 tasks x 2 seeds about 80 minutes. On a GPU raise them with --real-sizes
    # (e.g. max_steps=200,batch_size=16,cutoff_len=256,train_per_task=400,test_per_task=200,calibration_samples=256).
    return {**common, "r": 32, "lora_alpha": 32, "max_steps": 24, "batch_size": 8, "cutoff_len": 128,
            "learning_rate": 5e-4, "seeds": 2, "calibration_samples": 32, "calibration_batch_size": 16,
            "train_per_task": 40, "test_per_task": 20, "math_train": 200, "math_test": 20, "math_max_new_tokens": 32,
            "commonsense_max_new_tokens": 6, "eva_max_passes": 2}


CALIBRATION_KEYS = ("calibration_samples", "calibration_batch_size", "eva_max_passes")


def reusable(run: dict, old_config: Optional[dict], config: dict) -> bool:
    """Whether a stored run was made with these sizes (calibration sizes matter only to the calibrated methods)."""
    if old_config is None:
        return False
    if calibrated(run["method"]):
        return old_config == config
    ignore = set(CALIBRATION_KEYS)
    return {k: v for k, v in old_config.items() if k not in ignore} == {k: v for k, v in config.items() if k not in ignore}


def run(settings: Settings, log: Callable[[str], None] = print) -> dict:
    """Train and score every (task, method, seed), one process at a time; write bench/results/real.json."""
    started = time.time()
    config, methods, tasks, data_dir, machine = finetune_settings(settings, sizes(settings.scale), TASKS)
    path = settings.results_dir / f"{PART}.json"
    previous = json.loads(path.read_text()) if path.is_file() and not settings.quick else {}
    runs: list[dict] = [r for r in previous.get("runs", []) if reusable(r, previous.get("config"), config)]
    done = {(r["task"], r["method"], r["seed"]) for r in runs}
    work = Path(tempfile.mkdtemp(prefix="tlora-real-"))
    data: dict[str, Any] = {}
    try:
        base_model = base_model_path(settings.scale, work)
        data = {"commonsense": prepare_commonsense(data_dir, work, config), "math": prepare_math(data_dir, work, config)}
        # Task by task, seed by seed: a run cut short still leaves complete seeds of the first task.
        todo = [(t, m, s) for t in tasks for s in range(config["seeds"]) for m in methods if (t, m, s) not in done]
        log(f"real: {len(todo)} runs to do ({len(done)} already in {path.name}); logs in {work}")
        for index, (task, method, seed) in enumerate(todo, start=1):
            result = run_one(task, method, seed, config, data[task], base_model, work, settings.device,
                             settings.timeout_s, in_process=settings.isolation == "in-process")
            runs.append(result)
            extra = f"loss {result['heldout_loss']:.4f}" if task == "math" else ""
            log(f"[{index}/{len(todo)}] {task} {method} seed {seed}: acc {result['accuracy']:.3f} {extra} "
                f"params {result['trainable_parameters']:,} init {result['initialization_s']:.1f}s "
                f"train {result['training_s']:.1f}s eval {result['evaluation_process_s']:.1f}s")
            _write(settings, started, machine, config, data, base_model, runs)
        return _write(settings, started, machine, config, data, base_model, runs)
    finally:
        if settings.scale != "full" or not os.environ.get("TLORA_KEEP_REAL_WORK"):
            shutil.rmtree(work, ignore_errors=True)


def _write(settings: Settings, started: float, machine: dict, config: dict, data: dict, base_model: str,
           runs: list[dict]) -> dict:
    """The part's JSON from the runs so far (written after every run)."""
    summary = table(runs)
    header = part_header(PART, settings, machine, started)
    result = {
        **header,
        # A resumed part keeps the runs of earlier invocations: every command that contributed runs.
        "commands": _COMMANDS.setdefault("all", _earlier_commands(settings) + [settings.command]),
        "duration_s": time.time() - started,
        "config": {**config},
        "learning_rate_rule": f"one fixed learning rate {config['learning_rate']:g} for every method and task "
                              f"(AdamW, {config['lr_scheduler_type']}, warm-up {config['warmup_ratio']:g} of the steps)",
        "base_model": "tiny random Llama" if settings.scale == "tiny" else "SmolLM2-135M-Instruct",
        "data": {task: {k: v for k, v in d.items() if k.startswith("num_")} for task, d in data.items()},
        "runs": runs,
        "table": summary,
        "targets": target_checks(summary),
    }
    write_json(settings, PART, result)
    return result


_COMMANDS: dict[str, list[str]] = {}


def _earlier_commands(settings: Settings) -> list[str]:
    path = settings.results_dir / f"{PART}.json"
    if settings.quick or not path.is_file():
        return []
    data = json.loads(path.read_text())
    return [c for c in data.get("commands", [data.get("command")]) if c]


def table(runs: list[dict]) -> dict:
    """Per task and method: mean and std over seeds of accuracy (and math held-out loss), parameters and times; the
    average accuracy over the commonsense tasks and math."""
    out: dict[str, Any] = {}
    for task in TASKS:
        task_runs = [r for r in runs if r["task"] == task]
        if not task_runs:
            continue
        lora = next((r["trainable_parameters"] for r in task_runs if r["method"] == "lora"), None)
        out[task] = {}
        for method in ALL_METHODS:
            chosen = [r for r in task_runs if r["method"] == method]
            if not chosen:
                continue
            accuracies = [r["accuracy"] for r in chosen]
            entry = {
                "seeds": [r["seed"] for r in chosen],
                "accuracy_mean": mean(accuracies), "accuracy_std": std(accuracies), "accuracies": accuracies,
                "trainable_parameters": chosen[0]["trainable_parameters"],
                "parameters_over_lora": chosen[0]["trainable_parameters"] / lora if lora else None,
                "initialization_s_mean": mean([r["initialization_s"] for r in chosen]),
                "training_s_mean": mean([r["training_s"] for r in chosen]),
                "train_loss_mean": mean([r["train_loss"] for r in chosen]),
            }
            if task == "math":
                losses = [r["heldout_loss"] for r in chosen]
                entry.update(heldout_loss_mean=mean(losses), heldout_loss_std=std(losses))
            else:
                names = chosen[0]["per_task"]
                entry["per_task_mean"] = {name: mean([r["per_task"][name] for r in chosen]) for name in names}
            out[task][method] = entry
    return out


def target_checks(summary: dict) -> list[dict]:
    """TLoRA at least as good as the best baseline (commonsense average accuracy; math held-out loss) with at most
    60 % of LoRA's trainable parameters."""
    checks = []
    for task, methods in summary.items():
        if "tlora" not in methods or len(methods) < 2:
            continue
        key, sign = ("heldout_loss_mean", -1.0) if task == "math" else ("accuracy_mean", 1.0)
        baselines = {m: v[key] for m, v in methods.items() if m != "tlora"}
        best = max(baselines, key=lambda m: sign * baselines[m])
        what = "held-out loss, best baseline - TLoRA" if task == "math" else "average accuracy, TLoRA - best baseline"
        checks.append(target_check(f"{task}: {what} ({LABELS[best]})",
                                   sign * (methods["tlora"][key] - baselines[best]), 0.0, ">="))
        checks.append(target_check(f"{task}: TLoRA trainable parameters / LoRA's",
                                   methods["tlora"].get("parameters_over_lora"), 0.6))
    return checks


def markdown(data: dict) -> str:
    """The part's section of SUMMARY.md."""

    config, summary = data["config"], data["table"]
    lines = [
        f"## Real model: {data['base_model']} fine-tuned with the task scripts",
        "",
        f"`commonsense_train.py` on {data['data'].get('commonsense', {}).get('num_train', '?')} rows mixed from the "
        f"seven commonsense sets ({config['train_per_task']} each), scored by `commonsense/eval_commonsense.py` on "
        f"{config['test_per_task']} held-out rows per task; `math_train.py` on {config['math_train']} MATH problems "
        f"(solution + `The answer is: ...`), scored on {config['math_test']} held-out problems by `math/eval_math.py` "
        f"(greedy, ≤ {config['math_max_new_tokens']} new tokens) and by the held-out loss of their solutions. All "
        f"methods: r = {config['r']}, alpha = {config['lora_alpha']} (LoRA r/2 keeps alpha / r), the seven "
        f"projections, {config['max_steps']} steps of batch {config['batch_size']}, cut-off {config['cutoff_len']}, "
        f"{data['learning_rate_rule']}; {config['calibration_samples']} calibration rows (CorDA, LoRA-GA, EVA ≤ "
        f"{config['eva_max_passes']} passes, TLoRA). Mean ± std over seeds {list(range(config['seeds']))}; data seed "
        f"{config['data_seed']}.",
        "",
    ]
    cs, math = summary.get("commonsense", {}), summary.get("math", {})
    headers = ["method", "params", "/ LoRA"] + [t for t in COMMONSENSE_TASKS] + ["CS avg %", "MATH loss", "MATH acc %",
                                                                               "CS init / train s"]
    rows = []
    for method in ALL_METHODS:
        if method not in cs and method not in math:
            continue
        any_entry = cs.get(method) or math.get(method)
        row = [LABELS[method], fmt(any_entry["trainable_parameters"]), fmt(any_entry["parameters_over_lora"])]
        if method in cs:
            row += [f"{cs[method]['per_task_mean'].get(t, float('nan')) * 100:.1f}" for t in COMMONSENSE_TASKS]
            row += [f"{cs[method]['accuracy_mean'] * 100:.2f} ± {cs[method]['accuracy_std'] * 100:.2f} "
                    f"(n={len(cs[method]['seeds'])})"]
        else:
            row += ["—"] * (len(COMMONSENSE_TASKS) + 1)
        if method in math:
            row += [f"{math[method]['heldout_loss_mean']:.4f} ± {math[method]['heldout_loss_std']:.4f} "
                    f"(n={len(math[method]['seeds'])})",
                    f"{math[method]['accuracy_mean'] * 100:.1f}"]
        else:
            row += ["—", "—"]
        row += [f"{cs[method]['initialization_s_mean']:.1f} / {cs[method]['training_s_mean']:.1f}" if method in cs
                else "—"]
        rows.append(row)
    lines += [markdown_table(headers, rows), "",
              "Commands that contributed runs (the part resumes): " + "; ".join(f"`{c}`" for c in
                                                                            data.get("commands", [data["command"]])),
              ""]
    lines += targets_markdown(data["targets"])
    return "\n".join(lines)
