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
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

from common import (REPO_ROOT, Settings, comma_selection, fmt, machine_info, markdown_table, part_header, target_check,
                    write_json)
from quality import LABELS, METHODS, _mean, _std, shared_data_dir

PART = "real"
COMMONSENSE_TASKS = ("boolq", "piqa", "social_i_qa", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa")
TASKS = ("commonsense", "math")
# METHODS (bench name -> training-core method, rank factor) and LABELS are part 4's.


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


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------


def _shuffled(rows: list, seed: int) -> list:
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def prepare_commonsense(data_dir: Path, work: Path, config: dict) -> dict[str, Any]:
    """Held-out `<work>/commonsense_test/<task>/test.json` per task and one mixed training file."""
    train, held_out = [], {}
    for task in COMMONSENSE_TASKS:
        rows = _shuffled(json.loads((data_dir / "commonsense" / task / "test.json").read_text()), config["data_seed"])
        test = rows[: config["test_per_task"]]
        task_dir = work / "commonsense_test" / task
        task_dir.mkdir(parents=True, exist_ok=True)
        (task_dir / "test.json").write_text(json.dumps(test))
        held_out[task] = len(test)
        train += rows[config["test_per_task"] : config["test_per_task"] + config["train_per_task"]]
    train = _shuffled(train, config["data_seed"])
    _write_jsonl(work / "commonsense_train.jsonl", train)
    return {"train_file": str(work / "commonsense_train.jsonl"), "test_dir": str(work / "commonsense_test"),
            "num_train": len(train), "num_test": held_out}


def math_training_row(row: dict) -> dict:
    """A MATH problem as a MetaMathQA-style row: the solution followed by `The answer is: <boxed answer>`."""
    from tlora.evaluation.math_answers import gold_answer

    return {"query": row["problem"], "response": f"{row['solution']}\nThe answer is: {gold_answer(row['solution'])}"}


def prepare_math(data_dir: Path, work: Path, config: dict) -> dict[str, Any]:
    """Held-out MATH rows (for the scorer, and as query/response rows for the held-out loss) and training rows."""
    rows = [json.loads(line) for line in (data_dir / "math" / "test.jsonl").read_text().splitlines() if line.strip()]
    rows = _shuffled(rows, config["data_seed"])
    test = rows[: config["math_test"]]
    train = rows[config["math_test"] : config["math_test"] + config["math_train"]]
    _write_jsonl(work / "math_test.jsonl", test)
    _write_jsonl(work / "math_heldout_loss.jsonl", [math_training_row(row) for row in test])
    _write_jsonl(work / "math_train.jsonl", [math_training_row(row) for row in train])
    return {"train_file": str(work / "math_train.jsonl"), "test_file": str(work / "math_test.jsonl"),
            "loss_file": str(work / "math_heldout_loss.jsonl"), "num_train": len(train), "num_test": len(test)}


# ---------------------------------------------------------------------------------------------------------------
# One run: the task script, then the scorer
# ---------------------------------------------------------------------------------------------------------------


def training_command(task: str, method: str, seed: int, config: dict, data: dict, base_model: str, output_dir: Path,
                     device: str) -> list[str]:
    """The task script's command line for one run (every method gets the same options but its name and rank)."""
    core_method, factor = METHODS[method]
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
    if device == "cpu":
        command += ["--use_cpu", "True"]
    if task == "math":
        command += ["--eval_split", data["loss_file"]]
    return command


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
            device: str, timeout_s: float, in_process: bool = False) -> dict:
    """Train and score one (task, method, seed); the numbers from the run record and the scorer's result."""
    run_dir = work / "runs" / f"{task}-{method}-{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    train_s = _run_logged(training_command(task, method, seed, config, data, base_model, run_dir, device),
                          work / f"{task}-{method}-{seed}.train.log", timeout_s, in_process)
    record = json.loads((run_dir / "run_record.json").read_text())
    result_path = work / f"{task}-{method}-{seed}.eval.json"
    eval_s = _run_logged(evaluation_command(task, config, data, run_dir, result_path, device),
                         work / f"{task}-{method}-{seed}.eval.log", timeout_s, in_process)
    scored = json.loads(result_path.read_text())
    out = {
        "task": task, "method": method, "seed": seed,
        "trainable_parameters": record["trainable_parameters"],
        "initialization_s": record["initialization_wall_time_s"],
        "calibration_s": record.get("calibration_wall_time_s", 0.0),
        "training_s": record["training_wall_time_s"],
        "train_loss": record["train_loss"],
        "global_step": record["global_step"],
        "training_process_s": round(train_s, 2),
        "evaluation_process_s": round(eval_s, 2),
        "accuracy": scored["accuracy"],
        "num_items": scored["num_items"],
    }
    if task == "commonsense":
        out["per_task"] = {name: entry["accuracy"] for name, entry in scored["tasks"].items()}
    else:
        out["heldout_loss"] = record["eval_metrics"]["eval_loss"]
    shutil.rmtree(run_dir, ignore_errors=True)  # the adapter is not kept: only the numbers matter here
    return out


# ---------------------------------------------------------------------------------------------------------------
# The part
# ---------------------------------------------------------------------------------------------------------------


def base_model_path(scale: str, work: Path) -> str:
    """SmolLM2-135M-Instruct (full and quick sizes), or a tiny random Llama written to `work` (tiny: no wheel)."""
    if scale == "tiny":
        from tlora.training.toy_model import write_toy_model

        return str(write_toy_model(work / "tiny-llama", hidden_size=32, num_layers=2))
    from tlora.pretrained import smollm2_path

    return str(smollm2_path())


CALIBRATION_KEYS = ("calibration_samples", "calibration_batch_size", "eva_max_passes")


def reusable(run: dict, old_config: Optional[dict], config: dict) -> bool:
    """Whether a stored run was made with these sizes (calibration sizes matter only to the calibrated methods)."""
    if old_config is None:
        return False
    if METHODS[run["method"]][0] in ("corda", "loraga", "eva", "tlora"):
        return old_config == config
    ignore = set(CALIBRATION_KEYS)
    return {k: v for k, v in old_config.items() if k not in ignore} == {k: v for k, v in config.items() if k not in ignore}


def parse_overrides(text: Optional[str], config: dict) -> dict:
    """`max_steps=40,batch_size=8` as {"max_steps": 40, "batch_size": 8} (values take the type of the default)."""
    overrides = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        key, _, value = item.partition("=")
        if key not in config or not value:
            raise SystemExit(f"--real-sizes: {item!r} is not KEY=VALUE with KEY one of {', '.join(sorted(config))}")
        overrides[key] = type(config[key])(value)
    return overrides


def run(settings: Settings, log: Callable[[str], None] = print) -> dict:
    """Train and score every (task, method, seed), one process at a time; write bench/results/real.json."""
    started = time.time()
    config = sizes(settings.scale)
    if settings.extra.get("seeds"):
        config["seeds"] = int(settings.extra["seeds"])
    config.update(parse_overrides(settings.extra.get("real_sizes"), config))
    methods = comma_selection(settings.extra.get("methods"), list(METHODS), "methods")
    tasks = comma_selection(settings.extra.get("real_tasks"), TASKS, "tasks")
    data_dir = shared_data_dir(settings.extra.get("data_dir"))
    machine = machine_info(settings.device)
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
        for method in METHODS:
            chosen = [r for r in task_runs if r["method"] == method]
            if not chosen:
                continue
            accuracies = [r["accuracy"] for r in chosen]
            entry = {
                "seeds": [r["seed"] for r in chosen],
                "accuracy_mean": _mean(accuracies), "accuracy_std": _std(accuracies), "accuracies": accuracies,
                "trainable_parameters": chosen[0]["trainable_parameters"],
                "parameters_over_lora": chosen[0]["trainable_parameters"] / lora if lora else None,
                "initialization_s_mean": _mean([r["initialization_s"] for r in chosen]),
                "training_s_mean": _mean([r["training_s"] for r in chosen]),
                "train_loss_mean": _mean([r["train_loss"] for r in chosen]),
            }
            if task == "math":
                losses = [r["heldout_loss"] for r in chosen]
                entry.update(heldout_loss_mean=_mean(losses), heldout_loss_std=_std(losses))
            else:
                names = chosen[0]["per_task"]
                entry["per_task_mean"] = {name: _mean([r["per_task"][name] for r in chosen]) for name in names}
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
    from init_cost import targets_markdown

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
    for method in METHODS:
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
