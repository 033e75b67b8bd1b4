"""`make demo` end to end with a handful of steps: every promised file appears and the summary is consistent."""

import json

import pytest


@pytest.mark.slow
def test_demo_writes_plan_adapter_and_summary(tmp_path):
    from tlora.demo import main

    summary = main(["--output_dir", str(tmp_path), "--steps", "3", "--pretrain_steps", "2", "--hidden_size", "32"])
    run = tmp_path / "run"
    for name in ("adapter_model.safetensors", "adapter_config.json", "tlora_plan.json", "tlora_plan.png",
                 "tlora_init.safetensors", "run_record.json"):
        assert (run / name).is_file(), name
    plan = json.loads((run / "tlora_plan.json").read_text())
    assert summary["trainable_parameters"] == plan["trainable_parameters"] < summary["lora_trainable_parameters_same_r"]
    assert json.loads((tmp_path / "demo_summary.json").read_text()) == summary
    assert summary["held_out_loss_tlora"] > 0 and isinstance(summary["generated"], str)
