"""Trainer callbacks of the training core: TLoRA's frozen-A guard (AdaLoRA's callback lives in `adalora.py`)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..constants import PLAN_FILE, TLORA_INIT_FILE

logger = logging.getLogger(__name__)


def unwrap_peft_model(model: torch.nn.Module) -> torch.nn.Module:
    """The PeftModel inside a DeepSpeed engine or DDP wrapper."""
    while hasattr(model, "module") and not hasattr(model, "peft_config"):
        model = model.module
    return model


def live_lora_A(model: torch.nn.Module, names: list[str], adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The current A weight of each named module (names relative to the base model)."""
    base = unwrap_peft_model(model).base_model.model
    return {name: base.get_submodule(name).lora_A[adapter_name].weight for name in names}


class LoraAMismatchError(RuntimeError):
    """A TLoRA A matrix is trainable, or differs from the A the run started with."""


def check_lora_A(model: torch.nn.Module, expected: Mapping[str, torch.Tensor], when: str) -> None:
    """Raise unless every A is frozen and equal, bit for bit in the live dtype, to `expected`."""
    live = live_lora_A(model, sorted(expected))
    trainable = [name for name, weight in live.items() if weight.requires_grad]
    if trainable:
        raise LoraAMismatchError(f"{when}: TLoRA's A is trainable for {len(trainable)} modules, e.g. {trainable[:3]}")
    changed = []
    for name, weight in live.items():
        reference = expected[name].to(device=weight.device, dtype=weight.dtype)
        if weight.shape != reference.shape or not torch.equal(weight.detach(), reference):
            changed.append(name)
    if changed:
        raise LoraAMismatchError(
            f"{when}: TLoRA's A differs from the initial A of this run ({TLORA_INIT_FILE}) for {len(changed)} "
            f"modules, e.g. {changed[:3]}; the checkpoint does not belong to this plan or A was modified"
        )


class TLoRAGuardCallback(TrainerCallback):
    """Checks that A is frozen and unchanged when training starts (after any checkpoint was loaded) and ends, and
    writes the plan into every checkpoint folder so each checkpoint is a loadable TLoRA adapter."""

    def __init__(self, lora_A: Mapping[str, torch.Tensor], plan: Any):
        self.lora_A = dict(lora_A)
        self.plan = plan

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        check_lora_A(kwargs["model"], self.lora_A, "at the start of training")
        logger.info("TLoRA: A of %d modules is frozen and equal to the initial A.", len(self.lora_A))

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        check_lora_A(kwargs["model"], self.lora_A, "at the end of training")

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if state.is_world_process_zero:
            checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if os.path.isdir(checkpoint):
                self.plan.save(os.path.join(checkpoint, PLAN_FILE))
