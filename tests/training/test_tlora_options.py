"""--statistics_device and --statistics_cache reach TLoRA, with the calibration seed for the cache's record."""

from __future__ import annotations

import pytest
import torch
from peft import TaskType

from tlora import BudgetError
from tlora.training.core import parse_training_arguments
from tlora.training.data import CalibrationSet, PaddingCollator
from tlora.training.methods import MethodContext, build_tlora, tlora_config
from training_helpers import load_task


class _Stop(Exception):
    pass


def test_statistics_options_reach_tlora(tmp_path, monkeypatch):
    cache = tmp_path / "stats.safetensors"
    _, _, method, training = parse_training_arguments(
        load_task("math_train.py"), ["--statistics_device", "cpu", "--statistics_cache", str(cache)]
    )
    assert (method.statistics_device, method.statistics_cache) == ("cpu", str(cache))
    calibration = CalibrationSet(dataset=[], indices=[], seed=1234, collator=PaddingCollator(0))
    context = MethodContext(
        model=torch.nn.Linear(2, 2), arguments=method, training_args=training, task_type=TaskType.CAUSAL_LM,
        calibration=calibration, output_dir=tmp_path, total_steps=1,
    )
    assert tlora_config(context).statistics_device == "cpu"
    seen = {}

    def fake_get_tlora_model(model, config, data, **kwargs):
        seen.update(kwargs, statistics_device=config.statistics_device)
        raise _Stop

    monkeypatch.setattr("tlora.resume.get_tlora_model", fake_get_tlora_model)
    monkeypatch.setattr("tlora.resume.base_weights_fingerprint", lambda model, config: "")
    with pytest.raises(_Stop):
        build_tlora(context)
    assert seen["statistics_cache"] == str(cache)
    assert seen["calibration_seed"] == 1234 and seen["statistics_device"] == "cpu"


def test_max_rank_reaches_the_tlora_config(tmp_path):
    _, _, method, training = parse_training_arguments(load_task("math_train.py"), ["--max_rank", "64", "--lora_r", "32"])
    assert method.max_rank == 64
    calibration = CalibrationSet(dataset=[], indices=[], seed=0, collator=PaddingCollator(0))
    context = MethodContext(
        model=torch.nn.Linear(2, 2), arguments=method, training_args=training, task_type=TaskType.CAUSAL_LM,
        calibration=calibration, output_dir=tmp_path, total_steps=1,
    )
    assert tlora_config(context).max_rank == 64
    method.lora_r = 128  # the task's default r: its budget 128 x modules cannot fit under 64 x modules
    with pytest.raises(BudgetError, match="max_rank=64"):
        tlora_config(context)
    _, _, default, _ = parse_training_arguments(load_task("math_train.py"), [])
    assert default.max_rank is None
