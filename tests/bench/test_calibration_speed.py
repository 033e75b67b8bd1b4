"""Smoke test of bench/calibration_speed.py: the tiny mode runs floor and calibration (and a baseline copy of the
package, and the covariance products alone) and writes JSON with medians and ratios (timings are not checked)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_calibration_speed_tiny_writes_ratios_for_every_case(tmp_path):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    calibration_speed = importlib.import_module("calibration_speed")
    import tlora

    output = tmp_path / "calibration_speed.json"
    result = calibration_speed.main(
        ["--tiny", "--repeats", "1", "--baseline-src", str(Path(tlora.__file__).parent), "--output", str(output)]
    )
    assert output.exists()
    cases = {"floor", "compute_statistics", "compute_statistics, sensitivity='batch'", "baseline compute_statistics",
             "covariance products only", "per-sample |W*G| reductions only"}
    assert set(result["median_wall_s"]) == cases and set(result["ratio_to_floor_cpu"]) == cases
    assert result["ratio_to_floor_wall"]["floor"] == 1.0
    assert len(result["batches"]) == 2 and all(shape[0] == 4 and shape[1] <= 32 for shape in result["batches"])
    excess = result["profile_excess"]
    assert excess["floor_self_cpu_s"] > 0
    assert sum(excess["excess_by_group_s"].values()) == pytest.approx(excess["excess_self_cpu_s"])
    method = sum(excess["excess_by_group_s"][name] for name in calibration_speed.METHOD_ARITHMETIC)
    assert excess["method_arithmetic_over_floor"] == pytest.approx(method / excess["floor_self_cpu_s"])
    assert excess["excess_by_group_s"]["covariance / W C products"] > 0  # the floor forms no covariance
    agreement = result["batch_sensitivity_plan"]
    assert agreement["modules"] > 0 and 0 <= agreement["modules_with_another_rank"] <= agreement["modules"]
    assert (agreement["largest_rank_difference"] > 0) == (agreement["modules_with_another_rank"] > 0)
    assert agreement["largest_relative_sensitivity_share_difference"] >= 0
