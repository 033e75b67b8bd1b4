"""Output-folder safety: another run's folder is refused, a killed save never passes for a complete one, and
`load_tlora_model` checks what it loads (the plan, the saved files, the ranks, the base weights)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from tlora import load_tlora_model
from tlora.evaluation.models import ModelResolutionError, resolve_model
from tlora.outputs import AdapterFolderError, OutputFolderError, file_digest
from tlora.training import main
from tlora.training.core import check_output_dir, parse_training_arguments
from training_helpers import load_task, tiny_run_arguments

MATH = load_task("math_train.py")


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory) -> Path:
    """A finished one-step TLoRA run with a checkpoint (never modified: tests work on copies)."""
    output_dir = tmp_path_factory.mktemp("finished") / "run"
    main(MATH, run_arguments(tiny_model_dir, output_dir, "--save_strategy", "steps", "--save_steps", "1"))
    return output_dir


def run_arguments(model_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    return tiny_run_arguments(model_dir, output_dir, "tlora", "--max_steps", "1", *extra)


def copy_of(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def digests(folder: Path) -> dict[str, str]:
    return {path.name: file_digest(path) for path in sorted(folder.iterdir()) if path.is_file()}


def base_model(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def test_a_new_run_into_a_finished_runs_folder_is_refused(finished_run, tiny_model_dir, tmp_path):
    folder = copy_of(finished_run, tmp_path)
    before = digests(folder)
    with pytest.raises(OutputFolderError) as refused:
        main(MATH, run_arguments(tiny_model_dir, folder, "--seed", "7"))
    message = str(refused.value)
    for part in (str(folder), "adapter_model.safetensors", "checkpoint-1/", "run_record.json", "tlora_plan.json",
                 "--overwrite_output_dir", "--resume_from_checkpoint"):
        assert part in message
    assert digests(folder) == before and sorted(os.listdir(folder / "checkpoint-1"))  # nothing touched
    # The two ways to use the folder anyway pass the check; an unrelated file does not make a folder a run's.
    for flag in (["--overwrite_output_dir"], ["--resume_from_checkpoint", str(folder / "checkpoint-1")]):
        training_args = parse_training_arguments(MATH, run_arguments(tiny_model_dir, folder, *flag))[3]
        check_output_dir(training_args, training_args.resume_from_checkpoint)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("not a run")
    check_output_dir(parse_training_arguments(MATH, run_arguments(tiny_model_dir, tmp_path / "notes"))[3], None)


def test_a_run_killed_before_its_final_save_leaves_a_folder_that_load_refuses(
    finished_run, tiny_model_dir, tmp_path, monkeypatch
):
    from transformers import Trainer

    folder = copy_of(finished_run, tmp_path)
    old_adapter = file_digest(folder / "adapter_model.safetensors")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(Trainer, "save_model", killed)
    with pytest.raises(KeyboardInterrupt):  # another seed: another calibration draw, another plan
        main(MATH, run_arguments(tiny_model_dir, folder, "--seed", "7", "--overwrite_output_dir"))
    assert file_digest(folder / "adapter_model.safetensors") == old_adapter  # the old adapter, the new plan
    with pytest.raises(AdapterFolderError, match="tlora_plan.json"):
        load_tlora_model(base_model(tiny_model_dir), folder)
    with pytest.raises(ModelResolutionError, match="tlora_plan.json"):
        resolve_model(str(folder))


def test_a_save_killed_while_moving_its_files_into_place_is_refused(finished_run, tiny_model_dir, tmp_path, monkeypatch):
    folder = copy_of(finished_run, tmp_path)
    replace = os.replace

    def killed_at_the_weights(source, target, *args, **kwargs):
        if Path(source).parent.name == ".tlora-saving" and Path(source).name == "adapter_model.safetensors":
            raise KeyboardInterrupt("killed between two moves")
        return replace(source, target, *args, **kwargs)

    old_config = (folder / "adapter_config.json").read_text()
    monkeypatch.setattr(os, "replace", killed_at_the_weights)
    with pytest.raises(KeyboardInterrupt):
        main(MATH, run_arguments(tiny_model_dir, folder, "--seed", "7", "--overwrite_output_dir"))
    monkeypatch.setattr(os, "replace", replace)
    assert (folder / "adapter_config.json").read_text() != old_config  # the new configuration beside the old weights
    with pytest.raises(AdapterFolderError, match="adapter_config.json"):
        load_tlora_model(base_model(tiny_model_dir), folder)
    with pytest.raises(ModelResolutionError, match="mixes files of different saves"):
        resolve_model(str(folder))
    # The next run into the folder refuses it until the user says what to do, and a complete save repairs it.
    with pytest.raises(OutputFolderError, match=r"\.tlora-saving/"):
        main(MATH, run_arguments(tiny_model_dir, folder, "--seed", "7"))
    main(MATH, run_arguments(tiny_model_dir, folder, "--seed", "7", "--overwrite_output_dir"))
    assert not (folder / ".tlora-saving").exists()
    assert resolve_model(str(folder)).kind == "adapter"
    load_tlora_model(base_model(tiny_model_dir), folder)


def test_load_tlora_model_refuses_other_base_weights(finished_run, tiny_model_dir):
    other = base_model(tiny_model_dir)
    with torch.no_grad():
        other.model.layers[1].mlp.down_proj.weight.mul_(1.5)
    with pytest.raises(AdapterFolderError, match=r"target weights differ from those the adapter .* was trained on"):
        load_tlora_model(other, finished_run, is_trainable=True)
    loaded = load_tlora_model(base_model(tiny_model_dir), finished_run, is_trainable=True)
    trainable = [name for name, parameter in loaded.named_parameters() if parameter.requires_grad]
    assert trainable and all("lora_B" in name for name in trainable)


def test_load_tlora_model_names_the_module_whose_rank_was_edited(finished_run, tiny_model_dir, tmp_path):
    folder = copy_of(finished_run, tmp_path)
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    key = sorted(config["rank_pattern"])[0]
    config["rank_pattern"][key] += 1
    config_path.write_text(json.dumps(config))
    name = key.strip("^$").replace("\\", "")
    plan = json.loads((folder / "tlora_plan.json").read_text())
    rank = next(module["rank"] for module in plan["modules"] if module["name"] == name)
    with pytest.raises(AdapterFolderError, match=rf"gives {name} rank {rank + 1}, but tlora_plan.json .* has rank {rank}"):
        load_tlora_model(base_model(tiny_model_dir), folder)


def test_resume_with_other_target_modules_shows_both(finished_run, tiny_model_dir, tmp_path):
    folder = copy_of(finished_run, tmp_path)
    arguments = run_arguments(tiny_model_dir, folder, "--target_modules", "q_proj,v_proj")
    with pytest.raises(ValueError) as refused:
        main(MATH, arguments + ["--resume_from_checkpoint", str(folder / "checkpoint-1")])
    message = str(refused.value)
    assert "--target_modules q_proj,v_proj differs from the targets of the checkpoint's run" in message
    assert "types down_proj,gate_proj,k_proj,o_proj,q_proj,up_proj,v_proj" in message
    assert "these targets select 4" in message
