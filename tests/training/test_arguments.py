"""The command line: HfArgumentParser with every TrainingArguments flag, task defaults, batch-size resolution."""

from __future__ import annotations

import dataclasses

import pytest

from tlora.training import DataArguments, MethodArguments, ModelArguments, build_parser
from tlora.training.core import parse_training_arguments
from training_helpers import DS_CONFIG, load_task

SCRIPTS = ["math_train.py", "commonsense_train.py", "code_train.py", "chat_train.py", "nlu_train.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_documents_every_option(script):
    parser = build_parser(load_task(script))
    text = parser.format_help()
    for cls in (ModelArguments, DataArguments, MethodArguments):
        for field in dataclasses.fields(cls):
            assert f"--{field.name}" in text
            assert field.metadata.get("help"), f"{cls.__name__}.{field.name} has no help text"
    for flag in ("--deepspeed", "--resume_from_checkpoint", "--report_to", "--bf16", "--gradient_checkpointing"):
        assert flag in text


def test_math_defaults_are_the_papers():
    model, data, method, training = parse_training_arguments(load_task("math_train.py"), [])
    assert model.base_model == "meta-llama/Llama-2-7b-hf" and not model.trust_remote_code
    assert (data.data_path, data.dataset_field, data.max_samples, data.cutoff_len) == (
        "meta-math/MetaMathQA", ["query", "response"], 100_000, 512,
    )
    assert (method.method, method.lora_r, method.lora_alpha, method.calibration_samples) == ("tlora", 128, 128, 256)
    assert method.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert training.learning_rate == 2e-5 and training.num_train_epochs == 1
    assert training.lr_scheduler_type == "cosine" and training.warmup_steps == 0.03
    assert training.per_device_train_batch_size * training.gradient_accumulation_steps == 128  # one process
    assert training.report_to in ("none", [], ["none"]) and training.output_dir == "outputs/math-tlora"


def test_task_scripts_differ_only_in_their_defaults():
    commonsense = parse_training_arguments(load_task("commonsense_train.py"), ["--method", "lora"])
    _, data, method, training = commonsense
    assert data.input_field == "input" and data.dataset_field == ["instruction", "output"]
    assert (method.lora_r, method.lora_alpha, training.learning_rate) == (32, 32, 1e-4)
    assert training.per_device_train_batch_size * training.gradient_accumulation_steps == 32
    assert training.output_dir == "outputs/commonsense-lora"
    assert parse_training_arguments(load_task("code_train.py"), [])[1].dataset_field == ["query", "answer"]
    assert parse_training_arguments(load_task("chat_train.py"), [])[1].dataset_field == ["instruction", "output"]
    nlu = load_task("nlu_train.py")
    assert nlu.kind == "sequence_classification"
    assert parse_training_arguments(nlu, [])[1].dataset_config == "sst2"


def test_global_batch_size_sets_accumulation_and_rejects_contradictions():
    task = load_task("math_train.py")
    training = parse_training_arguments(task, ["--global_batch_size", "32", "--per_device_train_batch_size", "4"])[3]
    assert training.gradient_accumulation_steps == 8
    training = parse_training_arguments(task, ["--global_batch_size", "0", "--gradient_accumulation_steps", "3"])[3]
    assert training.gradient_accumulation_steps == 3
    with pytest.raises(ValueError, match="not a multiple"):
        parse_training_arguments(task, ["--global_batch_size", "30", "--per_device_train_batch_size", "4"])
    with pytest.raises(ValueError, match="contradicts"):
        parse_training_arguments(task, ["--global_batch_size", "32", "--gradient_accumulation_steps", "2"])


def test_a_flag_the_user_sets_wins_over_the_task_default_global_batch(monkeypatch, caplog):
    task = load_task("math_train.py")  # default global batch 128 of micro-batches of 8
    _, _, method, training = parse_training_arguments(task, ["--gradient_accumulation_steps", "1"])
    assert training.gradient_accumulation_steps == 1 and method.global_batch_size == 8
    from tlora.training.arguments import describe_global_batch

    assert describe_global_batch(training) == "global batch 8 = 8 per device x 1 processes x 1 accumulation steps"
    # abbreviated and --opt=value spellings are the user's flags too, as argparse reads them
    assert parse_training_arguments(task, ["--gradient_accumulation=3"])[3].gradient_accumulation_steps == 3
    monkeypatch.setenv("WORLD_SIZE", "2")
    _, _, method, training = parse_training_arguments(task, ["--gradient-accumulation-steps", "2"])
    assert training.gradient_accumulation_steps == 2 and method.global_batch_size == 32
    monkeypatch.delenv("WORLD_SIZE")
    # a per-device batch the default global batch is not a multiple of: rounded, with a warning, not an error
    with caplog.at_level("WARNING", logger="tlora"):
        _, _, method, training = parse_training_arguments(task, ["--per_device_train_batch_size", "3"])
    assert training.gradient_accumulation_steps == 43 and method.global_batch_size == 129
    assert "default global batch size 128 is not a multiple of 3" in caplog.text
    # two flags the user set that agree are fine
    training = parse_training_arguments(task, ["--global_batch_size", "16", "--gradient_accumulation_steps", "2"])[3]
    assert training.gradient_accumulation_steps == 2


def test_target_modules_accept_commas_and_spaces_and_bad_choices_fail():
    task = load_task("math_train.py")
    method = parse_training_arguments(task, ["--target_modules", "q_proj,v_proj", "o_proj"])[2]
    assert method.target_modules == ["q_proj", "v_proj", "o_proj"]
    with pytest.raises(SystemExit):
        parse_training_arguments(task, ["--method", "qlora"])


def test_deepspeed_config_fills_its_auto_values_from_the_arguments():
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    try:
        training = parse_training_arguments(
            load_task("math_train.py"),
            ["--deepspeed", str(DS_CONFIG), "--global_batch_size", "16", "--per_device_train_batch_size", "4", "--bf16", "false"],
        )[3]
        config = training.hf_deepspeed_config.config
        assert config["zero_optimization"]["stage"] == 2
        assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"], config["train_batch_size"]) == (4, 4, 16)
        assert config["bf16"]["enabled"] is False
    finally:
        unset_hf_deepspeed_config()


def test_a_per_device_batch_size_of_zero_is_refused_when_parsing():
    for option in ("--per_device_train_batch_size", "--per_device_eval_batch_size"):
        with pytest.raises(ValueError, match=f"{option} must be a positive number of examples, got 0"):
            parse_training_arguments(load_task("math_train.py"), [option, "0"])


def test_a_base_model_folder_that_does_not_exist_is_named(tmp_path):
    missing = tmp_path / "no_such_model"
    for option in ("--base_model", "--tokenizer"):
        with pytest.raises(ValueError, match=f"{option} {missing}: no such folder on this machine, and it is not a "
                           "Hugging Face hub id"):
            parse_training_arguments(load_task("math_train.py"), [option, str(missing)])
    (tmp_path / "weights.bin").write_text("")
    with pytest.raises(ValueError, match="is a file, not a model folder"):
        parse_training_arguments(load_task("math_train.py"), ["--base_model", str(tmp_path / "weights.bin")])
    assert parse_training_arguments(load_task("math_train.py"), ["--base_model", "org/model"])[0].base_model == "org/model"


def test_overwrite_output_dir_is_a_flag_of_the_training_arguments():
    assert "--overwrite_output_dir" in build_parser(load_task("math_train.py")).format_help()
    training = parse_training_arguments(load_task("math_train.py"), ["--overwrite_output_dir"])[3]
    assert training.overwrite_output_dir is True
    assert parse_training_arguments(load_task("math_train.py"), [])[3].overwrite_output_dir is False


def test_every_tlora_config_field_is_an_option_with_the_configs_choices():
    """TLoRAConfig's own fields are the TLoRA options (a new field needs no edit of arguments.py); the choices are
    the config's, and a value outside them is refused by the parser."""
    import torch
    from peft import TaskType

    from tlora.config import SVD_METHODS
    from tlora.training.methods import MethodContext, tlora_config

    _, _, method, training = parse_training_arguments(
        load_task("math_train.py"),
        ["--svd_niter", "3", "--svd_oversampling", "5", "--statistics_dtype", "float64", "--lora_r", "8"],
    )
    context = MethodContext(
        model=torch.nn.Linear(2, 2), arguments=method, training_args=training, task_type=TaskType.CAUSAL_LM,
        calibration=None, output_dir=training.output_dir, total_steps=1,
    )
    config = tlora_config(context)
    assert (config.svd_niter, config.svd_oversampling, config.statistics_dtype) == (3, 5, "float64")
    assert not hasattr(method, "freeze_lora_A")  # kept off the command line: the training core keeps A frozen
    svd_action = next(a for a in build_parser(load_task("math_train.py"))._actions if a.dest == "svd_method")
    assert list(svd_action.choices) == list(SVD_METHODS)
    with pytest.raises(SystemExit):
        parse_training_arguments(load_task("math_train.py"), ["--statistics_dtype", "float16"])


def test_method_choices_builders_and_labels_come_from_one_registry():
    from tlora.evaluation.report import display_method
    from tlora.methods_table import METHOD_TABLE
    from tlora.training import METHOD_BUILDERS, METHODS
    from tlora.training.registry import BASE_MODIFYING_METHODS, CALIBRATED_METHODS

    names = tuple(entry.name for entry in METHOD_TABLE)
    assert METHODS == names and tuple(METHOD_BUILDERS) == names
    assert [METHOD_BUILDERS[name].__name__ for name in ("lora", "adalora", "corda", "tlora")] == [
        "build_lora", "build_adalora", "build_corda", "build_tlora"
    ]
    assert [display_method(name) for name in ("loraga", "lora+", "full_finetuning", "tlora", "mine")] == [
        "LoRA-GA", "LoRA+", "FULL", "TLoRA", "mine"
    ]
    assert BASE_MODIFYING_METHODS == ("olora", "pissa", "loraga", "corda")
    assert CALIBRATED_METHODS == ("loraga", "corda", "eva", "tlora")
    method_action = next(a for a in build_parser(load_task("math_train.py"))._actions if a.dest == "method")
    assert list(method_action.choices) == list(names)
