"""Part "tuned" — every method at its own best learning rate: SmolLM2-135M-Instruct fine-tuned by the project's task
scripts (`math_train.py`, `commonsense_train.py`) with LoRA, LoRA r/2, DoRA, PiSSA, CorDA, LoRA-GA, EVA and TLoRA.

The rule (the same for every method):

* one learning-rate grid for all (`learning_rates`, log-spaced by `lr_step`); each (task, method) is trained at
  every rate with seed 0 and scored on a *validation* split (held-out loss);
* a method whose best rate sits at an edge of the grid gets the next rate beyond that edge (up to `max_widen`
  times), so no reported rate is a grid edge unless the JSON says so (`at_edge`);
* at the chosen rate, seeds 1 .. `seeds`-1 are added, and every number reported comes from a separate *test*
  split: held-out loss (both tasks), MATH accuracy (greedy, the project's scorer), and forgetting — the change of
  loss on general chat text none of the tasks trains on (MT-Bench first-turn questions with GPT-4's reference
  answers, written in the base model's own chat template, answer tokens scored) against the untuned base model.

Tasks: math — MATH problems (../shared/data/math), solutions in MetaMathQA's format ("... The answer is: X");
commonsense — the seven commonsense sets mixed (../shared/data/commonsense), scored by the held-out loss of the
answer (their accuracy sits near chance on a 135M model after a few steps and ranks nothing). Splits are disjoint and
drawn with `data_seed`; nothing is written into the repository.

Resumable: `bench/results/tuned.json` is rewritten after every run, and a rerun with the same sizes skips the runs
already in it (any process kill loses at most the run in flight). The same command scales to a GPU with
`--device cuda --real-sizes max_steps=200,batch_size=16,...`.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

from common import (ALL_METHODS, LABELS, PROPOSED, Settings, finetune_settings, fmt, markdown_table, mean,
                    part_header, std, target_check, targets_markdown, write_json)
from finetune import (COMMONSENSE_TASKS, base_model_path, chat_answer_loss, math_training_row, run_one,
                      shuffled_rows, write_jsonl)

PART = "tuned"
TASKS = ("math", "commonsense")
BASE = "base"  # the untuned model: one run per task at learning rate 0 (B = 0 stays 0), for forgetting


def sizes(scale: str) -> dict[str, Any]:
    """Hyper-parameters of the part (the same for every method; the learning rate is the grid's)."""
    common = {"data_seed": 0, "lr_scheduler_type": "cosine", "warmup_ratio": 0.03, "eval_batch_size": 16,
              "lr_step": round(math.sqrt(10), 6), "max_widen": 2}
    if scale == "tiny":
        return {**common, "r": 4, "lora_alpha": 4, "max_steps": 2, "batch_size": 2, "cutoff_len": 768,
                "learning_rates": [1e-3, 3.162278e-3], "seeds": 2, "calibration_samples": 4,
                "calibration_batch_size": 2, "train_per_task": 2, "validation_per_task": 1, "test_per_task": 1,
                "math_train": 8, "math_validation": 2, "math_test": 2, "general_rows": 3, "general_cutoff_len": 256,
                "math_max_new_tokens": 8,
                "eva_max_passes": 1, "max_widen": 1}
    if scale == "quick":
        return {**common, "r": 8, "lora_alpha": 8, "max_steps": 4, "batch_size": 4, "cutoff_len": 128,
                "learning_rates": [3.162278e-4, 1e-3], "seeds": 2, "calibration_samples": 8,
                "calibration_batch_size": 4, "train_per_task": 8, "validation_per_task": 2, "test_per_task": 2,
                "math_train": 32, "math_validation": 5, "math_test": 5, "general_rows": 10, "general_cutoff_len": 256,
                "math_max_new_tokens": 16, "eva_max_passes": 2, "max_widen": 1}
    # Sized for a quiet 2-core CPU machine: one run (training with three held-out losses, plus MATH scoring) takes
    # about 2-3 minutes there; 8 methods x 2 tasks x 4 rates + the seeds is about 80 runs, so the part is meant to
    # be resumed across sittings. On a GPU raise the sizes with --real-sizes.
    return {**common, "r": 32, "lora_alpha": 32, "max_steps": 24, "batch_size": 8, "cutoff_len": 128,
            "learning_rates": [1e-4, 3.162278e-4, 1e-3, 3.162278e-3], "seeds": 2, "calibration_samples": 32,
            "calibration_batch_size": 16, "train_per_task": 40, "validation_per_task": 10, "test_per_task": 20,
            "math_train": 200, "math_validation": 40, "math_test": 40, "general_rows": 30, "general_cutoff_len": 512,
            "math_max_new_tokens": 32, "eva_max_passes": 2}


# ---------------------------------------------------------------------------------------------------------------
# Data: train / validation / test per task, and the general text of the forgetting column
# ---------------------------------------------------------------------------------------------------------------


def general_rows(data_dir: Path, count: int) -> list[tuple[str, str]]:
    """MT-Bench first-turn questions with GPT-4's reference answers: (question, answer), the first `count`."""
    bench = data_dir / "mt_bench"
    questions = {}
    for line in (bench / "question.jsonl").read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            questions[row["question_id"]] = row["turns"][0]
    pairs = []
    for line in (bench / "reference_answer" / "gpt-4.jsonl").read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            pairs.append((questions[row["question_id"]], row["choices"][0]["turns"][0]))
    return pairs[:count]


def prepare_math_splits(data_dir: Path, work: Path, config: dict) -> dict:
    """MATH rows: test (scored and held-out loss), validation (held-out loss), train."""
    rows = [json.loads(line) for line in (data_dir / "math" / "test.jsonl").read_text().splitlines() if line.strip()]
    rows = shuffled_rows(rows, config["data_seed"])
    test = rows[: config["math_test"]]
    validation = rows[len(test): len(test) + config["math_validation"]]
    start = len(test) + len(validation)
    train = rows[start: start + config["math_train"]]
    write_jsonl(work / "math" / "test_problems.jsonl", test)
    files = {"validation": [math_training_row(r) for r in validation], "test": [math_training_row(r) for r in test],
             "train": [math_training_row(r) for r in train]}
    for name, split in files.items():
        write_jsonl(work / "math" / f"{name}.jsonl", split)
    return {"train_file": str(work / "math" / "train.jsonl"), "test_file": str(work / "math" / "test_problems.jsonl"),
            "loss_files": {name: str(work / "math" / f"{name}.jsonl") for name in ("validation", "test")},
            "num_train": len(train), "num_validation": len(validation), "num_test": len(test)}


def prepare_commonsense_splits(data_dir: Path, work: Path, config: dict) -> dict:
    """The seven commonsense sets, each split into test / validation / train rows, then mixed per split."""
    splits: dict[str, list[dict]] = {"test": [], "validation": [], "train": []}
    for task in COMMONSENSE_TASKS:
        rows = shuffled_rows(json.loads((data_dir / "commonsense" / task / "test.json").read_text()),
                             config["data_seed"])
        bounds = {"test": config["test_per_task"], "validation": config["validation_per_task"],
                  "train": config["train_per_task"]}
        start = 0
        for name, count in bounds.items():
            splits[name] += [{k: row[k] for k in ("instruction", "input", "output")} for row in rows[start: start + count]]
            start += count
    splits = {name: shuffled_rows(rows, config["data_seed"]) for name, rows in splits.items()}
    for name, rows in splits.items():
        write_jsonl(work / "commonsense" / f"{name}.jsonl", rows)
    return {"train_file": str(work / "commonsense" / "train.jsonl"),
            "loss_files": {name: str(work / "commonsense" / f"{name}.jsonl") for name in ("validation", "test")},
            "num_train": len(splits["train"]), "num_validation": len(splits["validation"]),
            "num_test": len(splits["test"])}


# ---------------------------------------------------------------------------------------------------------------
# The schedule: what to run next, from the runs so far
# ---------------------------------------------------------------------------------------------------------------


def rate_key(rate: float) -> str:
    """A learning rate as it is stored and compared (4 significant digits)."""
    return f"{rate:.4g}"


def grid_of(runs: list[dict], task: str, method: str, config: dict) -> list[float]:
    """The rates of (task, method): the common grid, widened where its best validation loss sat at an edge."""
    rates = sorted(config["learning_rates"])
    done = {rate_key(r["learning_rate"]): r["validation_loss"] for r in runs
            if r["task"] == task and r["method"] == method and r["seed"] == 0}
    below = above = 0  # rates added past each edge, k steps of lr_step from the grid's own end
    grid = [float(rate_key(r)) for r in rates]
    for _ in range(config["max_widen"]):
        if any(rate_key(r) not in done for r in grid):
            return grid
        best = min(grid, key=lambda r: done[rate_key(r)])
        if best == grid[0]:
            below += 1
            grid.insert(0, float(rate_key(rates[0] / config["lr_step"] ** below)))
        elif best == grid[-1]:
            above += 1
            grid.append(float(rate_key(rates[-1] * config["lr_step"] ** above)))
        else:
            return grid
    return grid


def chosen_rate(runs: list[dict], task: str, method: str, config: dict) -> Optional[float]:
    """The grid rate with the lowest seed-0 validation loss, once every grid rate has run (None before)."""
    grid = grid_of(runs, task, method, config)
    done = {rate_key(r["learning_rate"]): r["validation_loss"] for r in runs
            if r["task"] == task and r["method"] == method and r["seed"] == 0}
    if any(rate_key(r) not in done for r in grid):
        return None
    return min(grid, key=lambda r: done[rate_key(r)])


def next_runs(runs: list[dict], tasks: list[str], methods: list[str], config: dict) -> list[tuple[str, str, float, int]]:
    """The runs still to do as (task, method, rate, seed): the untuned base first, then every grid rate at seed 0,
    then the other seeds at each chosen rate — task by task, so a part cut short leaves complete tasks."""
    have = {(r["task"], r["method"], rate_key(r["learning_rate"]), r["seed"]) for r in runs}
    todo = []
    for task in tasks:
        if (task, BASE, rate_key(0.0), 0) not in have:
            todo.append((task, BASE, 0.0, 0))
        for method in methods:
            todo += [(task, method, rate, 0) for rate in grid_of(runs, task, method, config)
                     if (task, method, rate_key(rate), 0) not in have]
        for method in methods:
            rate = chosen_rate(runs, task, method, config)
            if rate is not None:
                todo += [(task, method, rate, seed) for seed in range(1, config["seeds"])
                         if (task, method, rate_key(rate), seed) not in have]
    return todo


# ---------------------------------------------------------------------------------------------------------------
# The part
# ---------------------------------------------------------------------------------------------------------------


def run_config(config: dict, method: str, rate: float) -> dict:
    """The sizes of one run: the part's, at `rate` (the base: one step at rate 0, which leaves B = 0)."""
    if method == BASE:
        return {**config, "learning_rate": 0.0, "max_steps": 1}
    return {**config, "learning_rate": rate}


def train_one(task: str, method: str, rate: float, seed: int, config: dict, data: dict, base_model: str, work: Path,
              settings: Settings, general: list[tuple[str, str]]) -> dict:
    """One run through the task script (MATH runs are scored too); its numbers with the rate it ran at, and the
    loss of the general chat answers under the trained adapter (the forgetting probe)."""
    core = "lora" if method == BASE else method

    def probe(run_dir: Path) -> dict:
        return {"general_loss": chat_answer_loss(run_dir, general, config["general_cutoff_len"], settings.device)}

    result = run_one(task, core, seed, run_config(config, method, rate), data, base_model, work, settings.device,
                     settings.timeout_s, in_process=settings.isolation == "in-process", score=task == "math",
                     name=f"{task}-{method}-{rate_key(rate)}-{seed}", probe=probe)
    return {**result, "method": method, "learning_rate": float(rate_key(rate))}


def previous_runs(path: Path, config: dict) -> list[dict]:
    """The runs of an earlier invocation with the same sizes (the grid, seeds and widening may differ)."""
    if not path.is_file():
        return []
    previous = json.loads(path.read_text())
    schedule = ("learning_rates", "seeds", "max_widen")
    same = {k: v for k, v in previous.get("config", {}).items() if k not in schedule} == \
        {k: v for k, v in config.items() if k not in schedule}
    return list(previous.get("runs", [])) if same else []


def run(settings: Settings, log: Callable[[str], None] = print) -> dict:
    """Run (or resume) the tuned comparison; write bench/results/tuned.json after every run."""
    started = time.time()
    config, methods, tasks, data_dir, machine = finetune_settings(settings, sizes(settings.scale), TASKS)
    path = settings.results_dir / f"{PART}.json"
    runs = previous_runs(path, config)
    work = Path(tempfile.mkdtemp(prefix="tlora-tuned-"))
    try:
        base_model = base_model_path(settings.scale, work)
        general = general_rows(data_dir, config["general_rows"])
        data = {"math": prepare_math_splits(data_dir, work, config),
                "commonsense": prepare_commonsense_splits(data_dir, work, config)}
        log(f"tuned: {len(runs)} runs already in {path.name}; logs in {work}")
        index = 0
        while todo := next_runs(runs, tasks, methods, config):
            task, method, rate, seed = todo[0]
            index += 1
            result = train_one(task, method, rate, seed, config, data[task], base_model, work, settings, general)
            runs.append(result)
            log(f"[{index}, {len(todo) - 1} known to go] {task} {method} lr {rate:g} seed {seed}: "
                f"validation {result['validation_loss']:.4f} test {result['test_loss']:.4f} "
                f"general {result['general_loss']:.4f} train {result['training_s']:.0f}s")
            _write(settings, started, machine, config, data, runs, tasks, methods)
        return _write(settings, started, machine, config, data, runs, tasks, methods)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _write(settings: Settings, started: float, machine: dict, config: dict, data: dict, runs: list[dict],
           tasks: list[str], methods: list[str]) -> dict:
    """The part's JSON from the runs so far."""
    # The table covers every method with runs in the file, whichever --methods this invocation was given.
    present = [m for m in ALL_METHODS if m in methods or any(r["method"] == m for r in runs)]
    summary = table(runs, tasks, present, config)
    result = {
        **part_header(PART, settings, machine, started),
        "commands": sorted({*_earlier_commands(settings), settings.command}),
        "duration_s": time.time() - started,
        "config": config,
        "learning_rate_rule": "per (task, method): lowest seed-0 validation loss over one log grid shared by all "
                              f"methods ({', '.join(f'{r:g}' for r in config['learning_rates'])}; step "
                              f"{config['lr_step']:g}), widened past an edge up to {config['max_widen']} times; "
                              "reported numbers on the test split, mean and sample std over seeds at that rate",
        "base_model": "tiny random Llama" if settings.scale == "tiny" else "SmolLM2-135M-Instruct",
        "data": {task: {k: v for k, v in d.items() if k.startswith("num_")} for task, d in data.items()},
        "runs": runs,
        "table": summary,
        "targets": target_checks(summary),
    }
    write_json(settings, PART, result)
    return result


def _earlier_commands(settings: Settings) -> list[str]:
    path = settings.results_dir / f"{PART}.json"
    return list(json.loads(path.read_text()).get("commands", [])) if path.is_file() else []


def method_entry(runs: list[dict], task: str, method: str, config: dict, base: Optional[dict]) -> Optional[dict]:
    """One (task, method) cell: its grid, chosen rate, and test numbers over the seeds at that rate."""
    rate = chosen_rate(runs, task, method, config)
    mine = [r for r in runs if r["task"] == task and r["method"] == method]
    if rate is None or not mine:
        return None
    grid = grid_of(runs, task, method, config)
    chosen = [r for r in mine if rate_key(r["learning_rate"]) == rate_key(rate)]
    forgetting = [r["general_loss"] - base["general_loss"] for r in chosen] if base else []
    entry = {
        "learning_rate": rate, "at_edge": rate in (grid[0], grid[-1]) and len(grid) > 2,
        "grid": {rate_key(r["learning_rate"]): r["validation_loss"] for r in mine if r["seed"] == 0},
        "seeds": sorted(r["seed"] for r in chosen),
        "test_loss_mean": mean([r["test_loss"] for r in chosen]), "test_loss_std": std([r["test_loss"] for r in chosen]),
        "forgetting_mean": mean(forgetting) if forgetting else None,
        "forgetting_std": std(forgetting) if forgetting else None,
        "trainable_parameters": chosen[0]["trainable_parameters"],
        "initialization_s_mean": mean([r["initialization_s"] for r in chosen]),
        "training_s_mean": mean([r["training_s"] for r in chosen]),
    }
    if task == "math":
        accuracies = [r["accuracy"] for r in chosen]
        entry.update(accuracy_mean=mean(accuracies), accuracy_std=std(accuracies))
    return entry


def table(runs: list[dict], tasks: list[str], methods: list[str], config: dict) -> dict:
    """Per task and method the tuned cell; per method the test loss relative to LoRA's, averaged over tasks."""
    out: dict[str, Any] = {}
    for task in tasks:
        base = next((r for r in runs if r["task"] == task and r["method"] == BASE), None)
        cells = {m: e for m in methods if (e := method_entry(runs, task, m, config, base)) is not None}
        if base:
            cells[BASE] = {"test_loss_mean": base["test_loss"], "general_loss": base["general_loss"],
                           **({"accuracy_mean": base["accuracy"]} if "accuracy" in base else {})}
        lora = cells.get("lora")
        for method, cell in cells.items():
            if method != BASE and lora:
                cell["parameters_over_lora"] = cell["trainable_parameters"] / lora["trainable_parameters"]
                cell["test_loss_over_lora"] = cell["test_loss_mean"] / lora["test_loss_mean"]
        out[task] = cells
    complete = [t for t in tasks if "lora" in out.get(t, {})]
    out["average"] = {m: mean([out[t][m]["test_loss_over_lora"] for t in complete])
                      for m in methods if complete and all(m in out[t] for t in complete)}
    out["complete_tasks"] = complete
    return out


def target_checks(summary: dict) -> list[dict]:
    """The issue's targets: TLoRA at <= 0.6x LoRA's parameters, and at least as good as the best tuned peer on the
    test loss relative to LoRA, averaged over the tasks."""
    average = summary.get("average", {})
    tasks = summary.get("complete_tasks", [])
    checks = []
    ratios = [summary[t]["tlora"]["parameters_over_lora"] for t in tasks if "tlora" in summary[t]]
    if ratios:
        checks.append(target_check("TLoRA trainable parameters / LoRA's", max(ratios), 0.6))
    peers = {m: v for m, v in average.items() if m != "tlora" and m not in PROPOSED}
    if "tlora" in average and peers:
        best = min(peers, key=peers.get)
        checks.append(target_check(f"TLoRA - best tuned peer ({LABELS[best]}), test loss / LoRA's, mean over tasks",
                                   average["tlora"] - peers[best], 0.0, "<="))
        for option in (m for m in PROPOSED if m in average):
            option_ratios = [summary[t][option]["parameters_over_lora"] for t in tasks if option in summary[t]]
            if option_ratios:
                checks.append(target_check(f"{LABELS[option]}: trainable parameters / LoRA's", max(option_ratios),
                                           0.6))
            checks.append(target_check(f"{LABELS[option]} - best tuned peer ({LABELS[best]}), same measure",
                                       average[option] - peers[best], 0.0, "<="))
    return checks


def markdown(data: dict) -> str:
    """The tuned table: per method its chosen rate and test numbers per task, the forgetting and the average."""
    summary, tasks = data["table"], [t for t in TASKS if t in data["table"]]
    lines = [f"## Tuned comparison ({data['base_model']})", "",
             f"Learning-rate rule: {data['learning_rate_rule']}.", ""]
    headers = ["method", "params / LoRA"]
    for task in tasks:
        headers += [f"{task}: lr", f"{task}: test loss", f"{task}: forgetting"]
        headers += ["math: acc %"] if task == "math" else []
    headers += ["test loss / LoRA (mean)", "n"]
    rows = []
    for method in [*ALL_METHODS, BASE]:
        cells = [summary[t].get(method) for t in tasks]
        if not any(cells):
            continue
        any_cell = next(c for c in cells if c)
        row = [LABELS.get(method, "base (untuned)"), fmt(any_cell.get("parameters_over_lora"))]
        for task, cell in zip(tasks, cells):
            row += _task_cells(task, cell)
        row += [fmt(summary["average"].get(method), 4),
                "/".join(str(len(c.get("seeds", [0]))) for c in cells if c)]
        rows.append(row)
    lines += [markdown_table(headers, rows), ""]
    lines += targets_markdown(data["targets"])
    return "\n".join(lines)


def _task_cells(task: str, cell: Optional[dict]) -> list[str]:
    if not cell:
        return ["—"] * (4 if task == "math" else 3)
    rate = f"{cell['learning_rate']:g}{' (edge)' if cell.get('at_edge') else ''}" if "learning_rate" in cell else "—"
    loss = f"{cell['test_loss_mean']:.4f}" + (f" ± {cell['test_loss_std']:.4f}" if "test_loss_std" in cell else "")
    forgetting = "—" if cell.get("forgetting_mean") is None else \
        f"{cell['forgetting_mean']:+.4f} ± {cell['forgetting_std']:.4f}"
    out = [rate, loss, forgetting]
    if task == "math":
        out.append(f"{cell['accuracy_mean'] * 100:.1f}" if "accuracy_mean" in cell else "—")
    return out
