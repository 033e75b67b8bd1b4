"""The real DeepSpeed launcher with the ZeRO-2 config: one and two CPU ranks derive the same TLoRA plan and A, a
resumed run keeps A bit for bit, and ranks that disagree stop the run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tlora import projector_distance
from tlora.training.record import read_run_record
from training_helpers import DS_CONFIG, SAMPLE_MATH, deepspeed_command, free_port, run_command

pytestmark = pytest.mark.slow
LAUNCH_TIMEOUT = 420


def math_arguments(model_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    """A 3-step TLoRA run of math_train.py under ZeRO-2 (global batch 8, a checkpoint at step 2)."""
    return [
        "--deepspeed", str(DS_CONFIG),
        "--base_model", str(model_dir),
        "--data_path", str(SAMPLE_MATH),
        "--method", "tlora",
        "--lora_r", "4",
        "--lora_alpha", "8",
        "--calibration_samples", "16",
        "--calibration_batch_size", "4",
        "--global_batch_size", "8",
        "--per_device_train_batch_size", "4",
        "--max_steps", "3",
        "--learning_rate", "1e-3",
        "--logging_steps", "1",
        "--save_steps", "2",
        "--disable_tqdm", "true",
        "--output_dir", str(output_dir),
        *extra,
    ]


@pytest.fixture(scope="module")
def launched_runs(deepspeed_ready, tiny_model_dir, tmp_path_factory) -> dict[int, Path]:
    """math_train.py launched by `deepspeed --num_gpus 1` and `--num_gpus 2` (CPU ranks)."""
    runs = {}
    for processes in (1, 2):
        output_dir = tmp_path_factory.mktemp(f"deepspeed-{processes}")
        command = deepspeed_command(processes, "math_train.py", math_arguments(tiny_model_dir, output_dir))
        run_command(command, LAUNCH_TIMEOUT, log=output_dir.parent / f"deepspeed-{processes}.log")
        runs[processes] = output_dir
    return runs


def test_one_and_two_ranks_derive_the_same_plan_and_A(launched_runs):
    records = {n: read_run_record(path) for n, path in launched_runs.items()}
    assert records[1]["world_size"] == 1 and records[2]["world_size"] == 2
    for record in records.values():
        assert record["status"] == "finished" and record["global_step"] == 3
        assert record["deepspeed"].endswith("ds_config_zero2_no_offload.json")
        assert record["arguments"]["training"]["gradient_accumulation_steps"] == (2 if record["world_size"] == 1 else 1)
    assert records[1]["calibration"]["indices"] == records[2]["calibration"]["indices"]
    plans = {n: json.loads((path / "tlora_plan.json").read_text()) for n, path in launched_runs.items()}
    assert [(m["name"], m["rank"], m["alpha"]) for m in plans[1]["modules"]] == [
        (m["name"], m["rank"], m["alpha"]) for m in plans[2]["modules"]
    ]
    one, two = (load_file(str(launched_runs[n] / "tlora_init.safetensors")) for n in (1, 2))
    assert sorted(one) == sorted(two)
    for name in one:
        # The two-rank statistics are the same sums in another order: equal up to float32 round-off.
        assert projector_distance(one[name], two[name]) < 1e-3, name
    for path in launched_runs.values():  # DeepSpeed checkpoints that also carry the plan
        checkpoint = path / "checkpoint-2"
        assert (checkpoint / "tlora_plan.json").is_file() and (checkpoint / "global_step2").is_dir()


def test_a_resumed_two_rank_run_keeps_A_and_finishes_like_the_uninterrupted_one(launched_runs, tiny_model_dir):
    output_dir = launched_runs[2]
    uninterrupted = load_file(str(output_dir / "adapter_model.safetensors"))
    initial = load_file(str(output_dir / "tlora_init.safetensors"))
    arguments = math_arguments(tiny_model_dir, output_dir, "--resume_from_checkpoint", str(output_dir / "checkpoint-2"))
    run_command(deepspeed_command(2, "math_train.py", arguments), LAUNCH_TIMEOUT, log=output_dir.parent / "resume.log")
    record = read_run_record(output_dir)
    assert record["resumed_from"].endswith("checkpoint-2") and record["method_details"]["rebuilt_from_output_dir"]
    resumed = load_file(str(output_dir / "adapter_model.safetensors"))
    for name, A in initial.items():
        assert torch.equal(resumed[f"base_model.model.{name}.lora_A.weight"], A)
    for key, value in uninterrupted.items():
        torch.testing.assert_close(resumed[key], value, atol=1e-6, rtol=1e-5)


def _resume_on_rank(rank: int, world_size: int, port: int, model_dir: str, directories: list[str], report: str) -> None:
    """One rank of a process group that rebuilds a TLoRA adapter from its own output folder."""
    from peft import TaskType
    from transformers import AutoModelForCausalLM

    from tlora.training.core import parse_training_arguments
    from tlora.training.methods import MethodContext
    from tlora.training.registry import build_method
    from training_helpers import load_task, report_on_gloo_rank

    def rebuild() -> None:
        arguments = ["--base_model", model_dir, "--method", "tlora", "--lora_r", "4", "--lora_alpha", "8", "--output_dir", directories[rank]]
        _, _, method_args, training_args = parse_training_arguments(load_task("math_train.py"), arguments)
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        build_method(MethodContext(model, method_args, training_args, TaskType.CAUSAL_LM, None, Path(directories[rank]), 1, resume=True))

    report_on_gloo_rank(rank, world_size, port, report, rebuild, "built")


def test_ranks_with_different_A_stop_before_training(tiny_model_dir, tmp_path):
    from safetensors.torch import save_file

    from tlora.training import main
    from training_helpers import load_task, tiny_run_arguments

    source = tmp_path / "source"
    main(load_task("math_train.py"), tiny_run_arguments(tiny_model_dir, source, "tlora", "--max_steps", "1"))
    directories = []
    for rank in range(2):
        directory = tmp_path / f"rank{rank}"
        directory.mkdir()
        (directory / "tlora_plan.json").write_text((source / "tlora_plan.json").read_text())
        initial = load_file(str(source / "tlora_init.safetensors"))
        if rank == 1:
            name = sorted(initial)[0]
            initial[name] = -initial[name]
        save_file(initial, str(directory / "tlora_init.safetensors"))
        directories.append(str(directory))
    report = tmp_path / "report"
    torch.multiprocessing.spawn(
        _resume_on_rank, args=(2, free_port(), str(tiny_model_dir), directories, str(report)), nprocs=2, join=True
    )
    for rank in range(2):
        assert "ranks disagree on the TLoRA plan and A" in report.with_suffix(f".{rank}").read_text()


def baseline_arguments(model_dir: Path, output_dir: Path, method: str) -> list[str]:
    """A 3-step run of `method` under ZeRO-2 on two ranks with 2 accumulation steps (global batch 8)."""
    return [
        "--deepspeed", str(DS_CONFIG),
        "--base_model", str(model_dir),
        "--data_path", str(SAMPLE_MATH),
        "--method", method,
        "--lora_r", "4",
        "--lora_alpha", "8",
        "--global_batch_size", "8",
        "--per_device_train_batch_size", "2",
        "--max_steps", "3",
        "--learning_rate", "1e-3",
        "--adalora_delta_t", "1",
        "--loraplus_lr_ratio", "16",
        "--logging_steps", "1",
        "--save_strategy", "no",
        "--disable_tqdm", "true",
        "--output_dir", str(output_dir),
    ]


@pytest.mark.parametrize("method", ["adalora", "loraplus"])
def test_adalora_and_loraplus_train_on_two_ranks(method, deepspeed_ready, tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    output_dir = tmp_path / method
    command = deepspeed_command(2, "math_train.py", baseline_arguments(tiny_model_dir, output_dir, method))
    run_command(command, LAUNCH_TIMEOUT, log=tmp_path / f"{method}.log")
    record = read_run_record(output_dir)
    assert record["status"] == "finished" and record["global_step"] == 3 and record["world_size"] == 2
    assert record["arguments"]["training"]["gradient_accumulation_steps"] == 2
    assert record["arguments"]["method"]["global_batch_size"] == 8
    adapter = load_file(str(output_dir / "adapter_model.safetensors"))
    config = json.loads((output_dir / "adapter_config.json").read_text())
    if method == "adalora":
        assert record["method_details"]["orth_reg_weight"] == 0.5
        kept = [sum(mask) for mask in config["rank_pattern"].values()]
        assert len(kept) == 14 and sum(kept) < 4 * 14  # the budget was allocated under ZeRO-2
        saved = sum(adapter[k].shape[0] for k in adapter if "lora_E" in k)
        assert saved == sum(kept)  # PEFT saves only the singular values the budget kept
    else:
        # LoRA+'s optimizer under ZeRO-2 (the Trainer's, as no 'optimizer' block replaces it): B at 16 x the lr of A
        assert record["method_details"]["loraplus_lr_ratio"] == 16
        assert {1e-3, 16e-3} <= set(record["optimizer_learning_rates"])
        assert all(adapter[k].abs().sum() > 0 for k in adapter if "lora_B" in k)
