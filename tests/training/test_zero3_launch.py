"""The real DeepSpeed launcher with a ZeRO-3 config (CPU rank over gloo): TLoRA refuses the partitioned weights with
its clear message, before any calibration pass."""

from __future__ import annotations

import os
import subprocess

import pytest

from training_helpers import REPO_ROOT, SAMPLE_MATH, deepspeed_command

pytestmark = pytest.mark.slow

ZERO3_CONFIG = REPO_ROOT / "config" / "ds_config_zero3.json"  # the baselines train under it; TLoRA refuses it


def test_zero3_is_refused_naming_the_module_and_the_fix(deepspeed_ready, tiny_model_dir, tmp_path):
    arguments = [
        "--deepspeed", str(ZERO3_CONFIG), "--base_model", str(tiny_model_dir), "--data_path", str(SAMPLE_MATH),
        "--method", "tlora", "--lora_r", "4", "--lora_alpha", "8", "--calibration_samples", "8",
        "--calibration_batch_size", "4", "--global_batch_size", "4", "--per_device_train_batch_size", "4",
        "--max_steps", "2", "--save_strategy", "no", "--disable_tqdm", "true", "--output_dir", str(tmp_path / "run"),
    ]
    environment = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    result = subprocess.run(deepspeed_command(1, "math_train.py", arguments), cwd=REPO_ROOT, env=environment,
                            capture_output=True, text=True, timeout=420, check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "CalibrationError: the weight of target module model.layers.0.self_attn.q_proj is partitioned by " \
           "DeepSpeed ZeRO-3 (local shape (0,), full shape (64, 64))" in output, output[-4000:]
    assert "Run TLoRA with ZeRO-2" in output
    assert "TLoRA calibration" not in output  # refused before the calibration pass
