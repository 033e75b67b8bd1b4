"""Trainer callbacks of the training core: TLoRA's frozen-A guard and AdaLoRA's budget allocation."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any, Optional

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

logger = logging.getLogger(__name__)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The PeftModel inside a DeepSpeed engine or DDP wrapper."""
    while hasattr(model, "module") and not hasattr(model, "peft_config"):
        model = model.module
    return model


def live_lora_A(model: torch.nn.Module, names: list[str], adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The current A weight of each named module (names relative to the base model)."""
    base = _unwrap(model).base_model.model
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
            f"{when}: TLoRA's A differs from the initial A of this run (tlora_init.safetensors) for {len(changed)} "
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
        from ..plan_report import PLAN_JSON

        if state.is_world_process_zero:
            checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if os.path.isdir(checkpoint):
                self.plan.save(os.path.join(checkpoint, PLAN_JSON))


class AdaLoraCallback(TrainerCallback):
    """Runs AdaLoRA's `update_and_allocate` once per optimizer step and fixes its schedule to the real step count.

    Without DeepSpeed it runs in `on_optimizer_step` (after `optimizer.step()`, before the gradients are zeroed), as
    PEFT documents. Under DeepSpeed the optimizer step happens inside the engine's backward, after which ZeRO has
    freed the gradients; there the engine's `step` is wrapped: the importance scores are updated from the reduced
    gradients just before the step, and a mask computed at this step is re-applied after it to the parameters and to
    ZeRO's fp32 master copy (which would otherwise overwrite it).
    """

    def __init__(self, arguments: Any):
        self.arguments = arguments
        self.trainer = None
        self.uses_engine_hook = False

    def attach(self, trainer) -> None:
        """Give the callback the trainer (needed to reach the DeepSpeed engine)."""
        self.trainer = trainer

    @staticmethod
    def _tuner(model: torch.nn.Module):
        return _unwrap(model).base_model

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        from .methods import adalora_schedule

        tuner = self._tuner(kwargs["model"])
        config = tuner.peft_config[tuner.trainable_adapter_name]
        schedule = adalora_schedule(self.arguments, state.max_steps)
        for key, value in schedule.items():
            setattr(config, key, value)
        logger.info("AdaLoRA schedule for %d steps: %s", state.max_steps, schedule)
        if self.trainer is not None and getattr(self.trainer, "is_deepspeed_enabled", False):
            self._hook_engine(self.trainer.model_wrapped, tuner)

    def _hook_engine(self, engine, tuner) -> None:
        original_step = engine.step
        trainer = self.trainer

        def step(*args, **kwargs):
            boundary = engine.is_gradient_accumulation_boundary()
            config = tuner.peft_config[tuner.trainable_adapter_name]
            pattern_before = config.rank_pattern
            if boundary:
                tuner.update_and_allocate(trainer.state.global_step)
            result = original_step(*args, **kwargs)
            if boundary:
                final_phase = trainer.state.global_step > config.total_step - config.tfinal
                if config.rank_pattern and (config.rank_pattern is not pattern_before or final_phase):
                    _reapply_adalora_mask(tuner, config.rank_pattern)
            return result

        engine.step = step
        self.uses_engine_hook = True

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if not self.uses_engine_hook:
            self._tuner(kwargs["model"]).update_and_allocate(state.global_step)


def _reapply_adalora_mask(tuner, rank_pattern: Mapping[str, Any]) -> None:
    """Zero the pruned singular values in the parameters and in DeepSpeed's fp32 master copy."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    adapter = tuner.trainable_adapter_name
    with torch.no_grad():
        for name, parameter in tuner.model.named_parameters():
            if f"lora_E.{adapter}" not in name:
                continue
            key = name if name in rank_pattern else name.replace(f".{adapter}", "")
            keep = torch.tensor(rank_pattern[key], dtype=torch.bool, device=parameter.device).view(-1, 1)
            parameter.masked_fill_(~keep, 0.0)
            master: Optional[torch.Tensor] = safe_get_full_fp32_param(parameter)
            if master is not None:
                safe_set_full_fp32_param(parameter, master.masked_fill(~keep.to(master.device), 0.0))
