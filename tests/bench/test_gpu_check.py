"""bench/gpu_check: skips cleanly without CUDA, and its checks, run on the CPU, pass with the expected numbers."""

from __future__ import annotations

import copy
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gpu_check():
    if str(REPO_ROOT / "bench") not in sys.path:
        sys.path.insert(0, str(REPO_ROOT / "bench"))
    return importlib.import_module("gpu_check")


def test_without_cuda_the_script_says_so_and_exits_0(tmp_path):
    environment = dict(os.environ, CUDA_VISIBLE_DEVICES="", OUT=str(tmp_path))
    result = subprocess.run(["bash", str(REPO_ROOT / "bench" / "gpu_check.sh")], capture_output=True, text=True,
                            env=environment, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "no CUDA device visible" in result.stdout and "SKIPPED" in result.stdout
    assert not (tmp_path / "gpu_check.json").exists()


def test_compare_statistics_reports_relative_errors(gpu_check):
    statistics = gpu_check.statistics_of(gpu_check.tiny_model(), gpu_check.padded_batches(num_samples=4))
    assert gpu_check.compare_statistics(statistics, statistics) == {
        "max_matrix_error": 0.0, "max_sensitivity_error": 0.0, "finite": True,
    }
    perturbed = copy.copy(statistics)
    perturbed.covariances = {k: v * 1.01 for k, v in statistics.covariances.items()}
    perturbed.covariances[next(iter(perturbed.covariances))][0, 0] = float("nan")
    errors = gpu_check.compare_statistics(statistics, perturbed)
    assert errors["finite"] is False and errors["max_sensitivity_error"] == 0.0


def test_split_device_map_puts_half_of_the_layers_on_each_device(gpu_check):
    device_map = gpu_check.split_device_map(gpu_check.tiny_model(), ["cuda:0", "cpu"])
    assert device_map["model.embed_tokens"] == "cuda:0" and device_map["lm_head"] == "cpu"
    assert [device_map[f"model.layers.{i}"] for i in range(2)] == ["cuda:0", "cpu"]


def test_the_table_shows_every_check_and_the_json_goes_to_OUT(gpu_check, tmp_path, monkeypatch):
    rows = [gpu_check.CheckResult("4bit", "PASS", 1.5, {"max_matrix_error": 0.0}),
            gpu_check.CheckResult("deepspeed", "FAIL", 2.0, {"error": "boom", "traceback": "long"})]
    table = gpu_check.format_table(rows)
    assert "4bit" in table and "PASS" in table and "FAIL" in table and "boom" in table and "long" not in table
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gpu_check.results_path() == tmp_path / "gpu_check.json"


@pytest.mark.slow
def test_every_check_but_deepspeed_passes_on_the_cpu(gpu_check, tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gpu_check.main(["--device", "cpu", "--skip", "deepspeed"]) == 0
    results = {r["name"]: r for r in json.loads((tmp_path / "gpu_check.json").read_text())["results"]}
    assert [r["status"] for r in results.values()] == ["PASS", "PASS", "PASS", "PASS", "SKIP"]
    split = results["padded batch split over cpu + cpu"]["details"]
    assert split["max_matrix_error"] == 0.0 and split["max_sensitivity_error"] == 0.0
    assert results["bitsandbytes 4-bit on cpu"]["details"]["max_matrix_error"] <= 1e-4
    assert results["calibration bfloat16 on cpu"]["details"]["max_matrix_error"] <= 0.08
