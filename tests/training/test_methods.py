"""Every method of the table trains a few steps through the core and saves what it should."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tlora.training import METHODS, main
from tlora.training.record import read_run_record
from training_helpers import LLAMA_TARGETS, load_task, tiny_run_arguments

MATH = load_task("math_train.py")
RANK = 4


@pytest.fixture(scope="module")
def run_method(tiny_model_dir, tmp_path_factory):
    """Run `math_train` in-process for a method (cached per argument set) and return (output_dir, record)."""
    cache = {}

    def run(method: str, *extra: str):
        key = (method, extra)
        if key not in cache:
            output_dir = tmp_path_factory.mktemp(f"run-{method}")
            record = main(MATH, tiny_run_arguments(tiny_model_dir, output_dir, method, "--merge", *extra))
            cache[key] = (output_dir, record)
        return cache[key]

    return run


def base_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def linear_shapes(model_dir) -> list[tuple[int, int]]:
    """(out, in) of every target projection of the tiny Llama."""
    names = LLAMA_TARGETS.split(",")
    return [
        (module.out_features, module.in_features)
        for name, module in base_model(model_dir).named_modules()
        if isinstance(module, torch.nn.Linear) and name.split(".")[-1] in names
    ]


def expected_trainable(method: str, model_dir, record: dict) -> int:
    """Trainable parameters each method must report on the tiny Llama at r = 4."""
    shapes = linear_shapes(model_dir)
    lora = sum(RANK * (out + inp) for out, inp in shapes)
    if method == "full":
        return sum(p.numel() for p in base_model(model_dir).parameters())
    if method == "dora":
        return lora + sum(out for out, _ in shapes)  # + one magnitude per output feature
    if method == "adalora":
        return lora + RANK * len(shapes)  # + the singular values E
    if method == "eva":  # ranks redistributed by EVA (rho), the same total
        pattern = record["method_details"]["rank_pattern"]
        return sum(pattern.get(name, RANK) * (out + inp) for name, (out, inp) in _named_shapes(model_dir).items())
    if method == "tlora":
        return record["method_details"]["plan_trainable_parameters"]
    return lora


def _named_shapes(model_dir) -> dict[str, tuple[int, int]]:
    names = LLAMA_TARGETS.split(",")
    return {
        name: (module.out_features, module.in_features)
        for name, module in base_model(model_dir).named_modules()
        if isinstance(module, torch.nn.Linear) and name.split(".")[-1] in names
    }


def logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_and_saves_what_it_should(method, run_method, tiny_model_dir):
    output_dir, record = run_method(method)
    assert record["status"] == "finished" and record["global_step"] == 2
    assert record["method"] == method and record["task"] == "math"
    assert record["trainable_parameters"] == expected_trainable(method, tiny_model_dir, record)
    assert set(record["library_versions"]) >= {"torch", "transformers", "peft", "tlora", "python"}
    assert record["training_wall_time_s"] > 0 and "calibration_wall_time_s" in record
    assert read_run_record(output_dir)["arguments"]["method"]["method"] == method
    files = {p.name for p in output_dir.iterdir()}
    assert {"run_record.json", "tokenizer.json", "merged"} <= files
    if method == "full":
        assert "model.safetensors" in files
    else:
        assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    if method in ("loraga", "corda", "eva", "tlora"):
        calibration = record["calibration"]
        assert calibration["num_samples"] == 8 and calibration["seed"] == 42 and len(calibration["indices"]) == 8
        assert calibration["draw"] == "dataset" and calibration["population"] == 64  # math_train.py: the authors' draw
        assert calibration["wall_time_s"] > 0
    if method in ("olora", "pissa", "loraga", "corda"):
        assert "initial_adapter" in files
        config = json.loads((output_dir / "adapter_config.json").read_text())
        assert config["r"] == 2 * RANK and config["init_lora_weights"] is True  # converted: delta W, rank 2r
    if method == "tlora":
        assert {"tlora_plan.json", "tlora_plan.png", "tlora_init.safetensors"} <= files
    if method == "eva":
        details = record["method_details"]
        assert details["forward_calls"] <= 2 * 2  # eva_max_passes x calibration batches: the loop is bounded


@pytest.mark.parametrize("method", ["lora", "tlora", "pissa", "corda", "loraga", "olora", "dora", "adalora", "eva"])
def test_saved_adapter_on_the_original_base_equals_the_merged_model(method, run_method, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    output_dir, _ = run_method(method)
    input_ids = torch.randint(3, 260, (2, 24), generator=torch.Generator().manual_seed(0))
    adapted = PeftModel.from_pretrained(base_model(tiny_model_dir), str(output_dir))
    merged = AutoModelForCausalLM.from_pretrained(output_dir / "merged", dtype=torch.float32)
    reference = logits(merged, input_ids)
    assert not torch.allclose(reference, logits(base_model(tiny_model_dir), input_ids), atol=1e-6), "training changed nothing"
    torch.testing.assert_close(logits(adapted, input_ids), reference, atol=2e-4, rtol=2e-4)


def test_lora_and_tlora_trainable_parameters(run_method, tiny_model_dir):
    _, lora = run_method("lora")
    output_dir, tlora = run_method("tlora")
    plan = json.loads((output_dir / "tlora_plan.json").read_text())
    shapes = _named_shapes(tiny_model_dir)
    b_only = sum(m["rank"] * shapes[m["name"]][0] for m in plan["modules"])
    assert tlora["trainable_parameters"] == b_only == plan["trainable_parameters"]  # B only: sum r_l * out_l
    assert lora["trainable_parameters"] == sum(RANK * (o + i) for o, i in shapes.values()) == plan["lora_trainable_parameters"]
    assert plan["total_rank"] == RANK * len(shapes)
    assert tlora["trainable_parameters"] < lora["trainable_parameters"]


def test_tlora_adapter_keeps_the_initial_A_and_is_plain_lora(run_method):
    output_dir, _ = run_method("tlora")
    initial = load_file(str(output_dir / "tlora_init.safetensors"))
    adapter = load_file(str(output_dir / "adapter_model.safetensors"))
    config = json.loads((output_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["rank_pattern"] and config["alpha_pattern"]
    trained_B = 0
    for name, A in initial.items():
        assert torch.equal(adapter[f"base_model.model.{name}.lora_A.weight"], A)
        trained_B += int(adapter[f"base_model.model.{name}.lora_B.weight"].abs().sum() > 0)
    assert trained_B == len(initial)


def test_tlora_resume_rebuilds_A_and_refuses_a_foreign_A(tiny_model_dir, tmp_path):
    from tlora.training.callbacks import LoraAMismatchError

    output_dir = tmp_path / "resume"
    arguments = tiny_run_arguments(tiny_model_dir, output_dir, "tlora", "--save_strategy", "steps", "--save_steps", "1")
    first = main(MATH, arguments)
    assert (output_dir / "checkpoint-1" / "tlora_plan.json").is_file()
    final = load_file(str(output_dir / "adapter_model.safetensors"))
    resumed = main(MATH, arguments + ["--resume_from_checkpoint", str(output_dir / "checkpoint-1")])
    assert resumed["method_details"]["rebuilt_from_output_dir"] and resumed["calibration_wall_time_s"] == 0
    assert resumed["method_details"]["lora_A_digest"] == first["method_details"]["lora_A_digest"]
    again = load_file(str(output_dir / "adapter_model.safetensors"))
    for key, value in final.items():
        if "lora_A" in key:
            assert torch.equal(again[key], value)
        else:
            torch.testing.assert_close(again[key], value, atol=1e-6, rtol=1e-5)
    # An A that is not the one the checkpoint was trained with must stop the run before any step.
    initial = load_file(str(output_dir / "tlora_init.safetensors"))
    name = sorted(initial)[0]
    initial[name] = -initial[name]
    save_file(initial, str(output_dir / "tlora_init.safetensors"))
    with pytest.raises(LoraAMismatchError, match="differs from the initial A"):
        main(MATH, arguments + ["--resume_from_checkpoint", str(output_dir / "checkpoint-1")])


def test_loraplus_optimizer_gives_B_a_larger_learning_rate(tiny_model_dir, tmp_path):
    from tlora.training.core import MethodTrainer, parse_training_arguments
    from tlora.training.methods import MethodContext
    from tlora.training.registry import build_method
    from peft import TaskType

    _, _, method_args, training_args = parse_training_arguments(
        MATH, tiny_run_arguments(tiny_model_dir, tmp_path, "loraplus", "--loraplus_lr_ratio", "8")
    )
    context = MethodContext(base_model(tiny_model_dir), method_args, training_args, TaskType.CAUSAL_LM, None, tmp_path, 2)
    built = build_method(context)
    trainer = MethodTrainer(model=built.model, args=training_args, optimizer_factory=built.optimizer_factory)
    optimizer = trainer.create_optimizer()
    rates = {}
    names = {id(p): n for n, p in built.model.named_parameters()}
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            rates[names[id(parameter)].split(".")[-3]] = group["lr"]
    assert rates == {"lora_A": 1e-3, "lora_B": 8e-3}


def test_adalora_allocates_its_budget_during_training(run_method):
    output_dir, record = run_method("adalora", "--adalora_delta_t", "1", "--max_steps", "3")
    config = json.loads((output_dir / "adapter_config.json").read_text())
    kept = [sum(mask) for mask in config["rank_pattern"].values()]
    assert len(kept) == 14 and sum(kept) < RANK * 14  # update_and_allocate pruned singular values


def test_adalora_names_the_modules_it_pruned_to_rank_zero():
    from tlora.training.adalora import pruned_modules

    pattern = {"layers.0.q_proj.lora_E": [False, False], "layers.0.v_proj.lora_E": [True, False]}
    assert pruned_modules(pattern) == ["layers.0.q_proj.lora_E"]
    assert pruned_modules(None) == [] and pruned_modules({}) == []


def test_named_evaluation_splits_each_get_their_own_loss(tiny_model_dir, tmp_path):
    """--eval_split NAME=FILE,NAME=FILE evaluates every file: `eval_NAME_loss` per file in the run record."""
    from training_helpers import SAMPLE_MATH

    rows = SAMPLE_MATH.read_text().splitlines()
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    first.write_text("\n".join(rows[:4]) + "\n")
    second.write_text("\n".join(rows[4:10]) + "\n")
    record = main(MATH, tiny_run_arguments(tiny_model_dir, tmp_path / "run", "lora",
                                           "--eval_split", f"validation={first},test={second}"))
    metrics = record["eval_metrics"]
    assert {"eval_validation_loss", "eval_test_loss"} <= set(metrics)
    assert metrics["eval_validation_loss"] > 0 and metrics["eval_test_loss"] > 0
    assert metrics["eval_validation_loss"] != metrics["eval_test_loss"]  # two different files, two measurements


def test_evaluation_splits_are_parsed_or_refused_clearly():
    """One unnamed split stays one; NAME=SPLIT pairs become a dict; a malformed or repeated name is refused."""
    from tlora.training.core import evaluation_splits

    assert evaluation_splits(None) == {}
    assert evaluation_splits("test") == {"": "test"}
    assert evaluation_splits("val=a.jsonl, test=b.jsonl") == {"val": "a.jsonl", "test": "b.jsonl"}
    for bad in ("val=a.jsonl,val=b.jsonl", "val=a.jsonl,=b.jsonl", "val=a.jsonl,test="):
        with pytest.raises(ValueError, match="NAME=SPLIT_OR_FILE"):
            evaluation_splits(bad)
