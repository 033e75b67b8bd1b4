"""The tuned comparison (`bench/tuned.py`): its learning-rate schedule (pure logic on recorded runs) and an end-to-end
run on a tiny random Llama through the task scripts, resumed with one more seed."""

from __future__ import annotations

import json

import pytest

from test_bench_smoke import _check_header, _check_targets, _load, _run_bench

CONFIG = {"learning_rates": [1e-4, 1e-3], "lr_step": 10.0, "max_widen": 2, "seeds": 2}


def _run(method: str, rate: float, loss: float, seed: int = 0, task: str = "math") -> dict:
    return {"task": task, "method": method, "learning_rate": rate, "seed": seed, "validation_loss": loss}


def test_grid_widens_past_the_edge_where_the_best_rate_sits_and_no_further_than_allowed():
    tuned = _load("tuned")
    runs = [_run("lora", 1e-4, 2.0), _run("lora", 1e-3, 1.0)]  # best at the upper edge
    assert tuned.grid_of(runs, "math", "lora", CONFIG) == [1e-4, 1e-3, 1e-2]
    assert tuned.chosen_rate(runs, "math", "lora", CONFIG) is None  # 1e-2 not run yet
    runs.append(_run("lora", 1e-2, 0.5))  # still the edge: one more step up
    assert tuned.grid_of(runs, "math", "lora", CONFIG) == [1e-4, 1e-3, 1e-2, 1e-1]
    runs.append(_run("lora", 1e-1, 0.4))  # edge again, but max_widen = 2 is spent
    assert tuned.grid_of(runs, "math", "lora", CONFIG) == [1e-4, 1e-3, 1e-2, 1e-1]
    assert tuned.chosen_rate(runs, "math", "lora", CONFIG) == 1e-1
    interior = [_run("tlora", 1e-4, 2.0), _run("tlora", 1e-3, 3.0), _run("tlora", 1e-5, 2.5)]
    assert tuned.grid_of(interior, "math", "tlora", CONFIG) == [1e-5, 1e-4, 1e-3]  # widened down once, then interior
    assert tuned.chosen_rate(interior, "math", "tlora", CONFIG) == 1e-4


def test_schedule_runs_the_base_then_the_grid_then_the_seeds_at_the_chosen_rate():
    tuned = _load("tuned")
    todo = tuned.next_runs([], ["math"], ["lora"], CONFIG)
    assert todo == [("math", "base", 0.0, 0), ("math", "lora", 1e-4, 0), ("math", "lora", 1e-3, 0)]
    runs = [_run("base", 0.0, 3.0), _run("lora", 1e-4, 1.0), _run("lora", 1e-3, 1.5), _run("lora", 1e-5, 1.2)]
    assert tuned.next_runs(runs, ["math"], ["lora"], CONFIG) == [("math", "lora", 1e-4, 1)]
    runs.append(_run("lora", 1e-4, 1.1, seed=1))
    assert tuned.next_runs(runs, ["math"], ["lora"], CONFIG) == []


def test_tuned_part_reports_test_numbers_at_each_chosen_rate_and_resumes(tmp_path, shared_data):
    _run_bench(tmp_path, "--parts", "tuned", "--methods", "lora,tlora", "--seeds", "1")
    first = json.loads((tmp_path / "tuned.json").read_text())
    _check_header(first, "tuned")
    config, runs = first["config"], first["runs"]
    for run in runs:
        assert run["global_step"] == (1 if run["method"] == "base" else config["max_steps"])
        assert run["validation_loss"] > 0 and run["test_loss"] > 0 and run["general_loss"] > 0
        assert ("accuracy" in run) == (run["task"] == "math")
    for task in ("math", "commonsense"):
        base = next(r for r in runs if r["task"] == task and r["method"] == "base")
        assert base["learning_rate"] == 0.0
        for method in ("lora", "tlora"):
            cell = first["table"][task][method]
            grid = {r["learning_rate"]: r["validation_loss"] for r in runs
                    if r["task"] == task and r["method"] == method and r["seed"] == 0}
            assert len(grid) >= len(config["learning_rates"])
            assert cell["learning_rate"] == min(grid, key=grid.get)
            chosen = [r for r in runs if r["task"] == task and r["method"] == method
                      and r["learning_rate"] == cell["learning_rate"]]
            assert cell["test_loss_mean"] == pytest.approx(sum(r["test_loss"] for r in chosen) / len(chosen))
            assert cell["forgetting_mean"] == pytest.approx(chosen[0]["general_loss"] - base["general_loss"])
        assert first["table"][task]["tlora"]["parameters_over_lora"] < 0.6
    _check_targets(first["targets"])
    assert "Tuned comparison" in (tmp_path / "SUMMARY.md").read_text()

    _run_bench(tmp_path, "--parts", "tuned", "--methods", "lora,tlora", "--seeds", "2")
    second = json.loads((tmp_path / "tuned.json").read_text())
    assert second["runs"][: len(runs)] == runs  # nothing redone
    added = second["runs"][len(runs):]
    assert sorted((r["task"], r["method"], r["seed"]) for r in added) == [
        ("commonsense", "lora", 1), ("commonsense", "tlora", 1), ("math", "lora", 1), ("math", "tlora", 1)]
    for run in added:
        assert run["learning_rate"] == first["table"][run["task"]][run["method"]]["learning_rate"]
    assert len(second["commands"]) == 2


def test_a_proposed_option_runs_only_when_named_and_is_never_the_peer_tlora_is_measured_against(tmp_path):
    common, finetune, tuned = _load("common"), _load("finetune"), _load("tuned")
    assert "tlora_uniform_scale" not in common.METHODS and "tlora_uniform_scale" in common.ALL_METHODS
    assert common.comma_selection(None, list(common.ALL_METHODS), "methods", default=list(common.METHODS)) == \
        list(common.METHODS)
    config = {"r": 8, "lora_alpha": 8, "max_steps": 1, "batch_size": 1, "learning_rate": 1e-3, "seed": 0,
              "lr_scheduler_type": "constant", "warmup_ratio": 0.0, "cutoff_len": 32, "calibration_samples": 2,
              "calibration_batch_size": 1, "eva_max_passes": 1}
    data = {"train_file": "t.jsonl", "loss_file": "l.jsonl"}
    command = finetune.training_command("math", "tlora_uniform_scale", 0, config, data, "base", tmp_path, "cpu")
    assert command[command.index("--method") + 1] == "tlora"
    assert command[command.index("--allocate_scales") + 1] == "False"
    assert "--allocate_scales" not in finetune.training_command("math", "tlora", 0, config, data, "base", tmp_path,
                                                                "cpu")
    # The option beats every peer here, and TLoRA does not: the TLoRA target still fails, the option's own passes.
    summary = {"complete_tasks": ["math"], "math": {"tlora": {"parameters_over_lora": 0.44}},
               "average": {"lora": 1.0, "dora": 0.99, "tlora": 1.01, "tlora_uniform_scale": 0.98}}
    checks = {check["target"].split(" (")[0]: check["met"] for check in tuned.target_checks(summary)}
    assert checks == {"TLoRA trainable parameters / LoRA's": True, "TLoRA - best tuned peer": False,
                      "TLoRA, uniform scales": True}


def test_a_proposed_option_with_a_larger_budget_is_held_to_the_parameter_bound_too(tmp_path):
    common, finetune, tuned = _load("common"), _load("finetune"), _load("tuned")
    config = {"r": 32, "lora_alpha": 32, "max_steps": 1, "batch_size": 1, "learning_rate": 1e-3, "seed": 0,
              "lr_scheduler_type": "constant", "warmup_ratio": 0.0, "cutoff_len": 32, "calibration_samples": 2,
              "calibration_batch_size": 1, "eva_max_passes": 1}
    data = {"train_file": "t.jsonl", "loss_file": "l.jsonl"}
    command = finetune.training_command("math", "tlora_wide", 0, config, data, "base", tmp_path, "cpu")
    assert command[command.index("--method") + 1] == "tlora"
    assert command[command.index("--lora_r") + 1] == "43" and command[command.index("--lora_alpha") + 1] == "43"
    label = common.LABELS["tlora_wide"]
    summary = {"complete_tasks": ["math"],
               "math": {"tlora": {"parameters_over_lora": 0.44}, "tlora_wide": {"parameters_over_lora": 0.61}},
               "average": {"lora": 1.0, "tlora": 1.01, "tlora_wide": 0.97}}
    checks = {check["target"]: check["met"] for check in tuned.target_checks(summary)}
    assert checks[f"{label}: trainable parameters / LoRA's"] is False
    assert checks[f"{label} - best tuned peer (LoRA r), same measure"] is True
