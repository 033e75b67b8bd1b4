"""`make demo` end to end (`--model tiny`, a handful of steps): every promised file appears, the summary is consistent."""

import json

import pytest


@pytest.mark.slow
def test_demo_writes_plan_adapter_and_summary(tmp_path):
    from tlora.demo import main

    summary = main(["--model", "tiny", "--output_dir", str(tmp_path), "--steps", "3", "--pretrain_steps", "2",
                    "--train_problems", "24", "--held_out", "4", "--calibration_samples", "8",
                    "--max_new_tokens", "8"])
    run = tmp_path / "run"
    for name in ("adapter_model.safetensors", "adapter_config.json", "tlora_plan.json", "tlora_plan.png",
                 "tlora_init.safetensors", "run_record.json"):
        assert (run / name).is_file(), name
    held_out = [json.loads(line) for line in (tmp_path / "data" / "held_out.jsonl").read_text().splitlines()]
    train = [json.loads(line) for line in (tmp_path / "data" / "train.jsonl").read_text().splitlines()]
    assert len(held_out) == 4 and len(train) == 24
    assert not {row["query"] for row in held_out} & {row["query"] for row in train}
    plan = json.loads((run / "tlora_plan.json").read_text())
    assert summary["trainable_parameters"] == plan["trainable_parameters"] < summary["lora_trainable_parameters_same_r"]
    assert len(plan["modules"]) == 14  # 2 layers x 7 projections
    assert summary["adapted_modules"] == sum(module["rank"] > 0 for module in plan["modules"]) >= 1
    assert json.loads((tmp_path / "demo_summary.json").read_text()) == summary
    assert summary["held_out_loss_base"] > 0 and summary["held_out_loss_tlora"] > 0
    assert 0 <= summary["accuracy_base"] <= 1 and 0 <= summary["accuracy_tlora"] <= 1
    assert [example["question"] for example in summary["examples"]] == [row["query"] for row in held_out[:3]]


def test_demo_options_override_the_profile_and_unknown_models_are_refused():
    from tlora.demo import PROFILES, build_parser

    options = build_parser().parse_args(["--steps", "5"])
    assert options.model == "smollm2" and options.steps == 5 and options.learning_rate is None
    assert PROFILES["smollm2"].steps > 5
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--model", "gpt5"])
