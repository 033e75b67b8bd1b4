"""AdaLoRA in the training core: its builder (`build_adalora`), its schedule fixed to the real step count,
`update_and_allocate` once per optimizer step (also under DeepSpeed), and its orthogonal regulariser weighted as its
authors intend.

The regulariser. PEFT's `AdaLoraModel.forward` adds `orth_reg_weight * R` (default 0.5) to every micro-batch's loss.
AdaLoRA's authors (and transformers 4) divided each micro-batch's loss by the accumulation steps and averaged the
gradients over the processes, so the optimizer saw `0.5 * grad R`. Transformers 5 normalises a model's token loss by
the token count of the whole global batch instead, and then neither divides by the accumulation steps nor lets the
gradient averaging over processes stand (it multiplies the loss by the number of processes); a term added to the loss
would count `0.5 x accumulation steps x processes` (0.5 x 2 x 8 = 8 at the paper's batch of 128: micro-batches of 8
on 8 GPUs, 2 accumulation steps). `OrthogonalRegulariserScale` divides the weight by the factor the Trainer applies,
micro-batch by micro-batch, so the optimizer sees `orth_reg_weight` whatever the accumulation and the world size.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from typing import Any, Optional

import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .arguments import MethodArguments
from .callbacks import unwrap_peft_model
from .methods import BuiltMethod, MethodContext, target_modules_option

logger = logging.getLogger(__name__)


def _schedule_steps(value: float, total: int) -> int:
    """A fraction (< 1) of the total steps, or a number of steps."""
    return int(value * total) if value < 1 else int(value)


def adalora_schedule(arguments: MethodArguments, total_steps: int) -> dict[str, int]:
    """AdaLoRA's total_step, tinit and tfinal for a run of `total_steps` optimizer steps (always a valid schedule)."""
    total = max(int(total_steps), 1)
    tinit = _schedule_steps(arguments.adalora_tinit, total)
    tfinal = _schedule_steps(arguments.adalora_tfinal, total)
    if tinit + tfinal >= total:
        logger.warning("AdaLoRA: tinit %d + tfinal %d leave no budgeting phase in %d steps; using 0 and 0.", tinit, tfinal, total)
        tinit, tfinal = 0, 0
    return {"total_step": total, "tinit": tinit, "tfinal": tfinal}


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
        return unwrap_peft_model(model).base_model

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
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

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        tuner = self._tuner(kwargs["model"])
        pruned = pruned_modules(tuner.peft_config[tuner.trainable_adapter_name].rank_pattern)
        if pruned:
            # PEFT's save_pretrained then warns that these modules' lora_A / lora_B are zero-sized "because ZeRO-3 /
            # FSDP shards were not gathered": for AdaLoRA it is its own rank-0 pruning, and the adapter reloads.
            logger.info("AdaLoRA pruned %d module(s) to rank 0 (%s%s); PEFT's 'invalid shape' warning at save is about "
                        "them and expected: the adapter reloads in stock PEFT", len(pruned), ", ".join(pruned[:3]),
                        " ..." if len(pruned) > 3 else "")


def pruned_modules(rank_pattern: Optional[Mapping[str, Any]]) -> list[str]:
    """Modules whose AdaLoRA rank mask keeps no singular value."""
    return [name for name, keep in (rank_pattern or {}).items() if not any(keep)]


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


def trainer_loss_multiplier(trainer: Trainer, num_items_in_batch: Any) -> int:
    """How many times the Trainer's backward counts a term added to one micro-batch's loss, relative to the 1 / steps
    weight of a mean loss (transformers 5: the conditions of `Trainer.training_step` and `Trainer.compute_loss`)."""
    scaled_for_accumulation = getattr(trainer, "loss_is_scaled_for_ga", None)
    if scaled_for_accumulation is None:
        scaled_for_accumulation = (
            trainer.model_accepts_loss_kwargs and num_items_in_batch is not None
        ) or trainer.compute_loss_func is not None
    multiplier = int(trainer.current_gradient_accumulation_steps) if scaled_for_accumulation else 1
    if (
        trainer.args.average_tokens_across_devices
        and (trainer.model_accepts_loss_kwargs or trainer.compute_loss_func)
        and num_items_in_batch is not None
    ):
        multiplier *= trainer.accelerator.num_processes // trainer.get_tp_size()
    return max(multiplier, 1)


class OrthogonalRegulariserScale:
    """While one micro-batch's loss is computed, AdaLoRA's `orth_reg_weight` divided by the Trainer's multiplier."""

    def __init__(self, model: torch.nn.Module):
        tuner = unwrap_peft_model(model).base_model
        self.config = tuner.peft_config[tuner.trainable_adapter_name]

    @contextlib.contextmanager
    def __call__(self, trainer: Trainer, num_items_in_batch: Any) -> Iterator[None]:
        weight = self.config.orth_reg_weight
        self.config.orth_reg_weight = weight / trainer_loss_multiplier(trainer, num_items_in_batch)
        try:
            yield
        finally:
            self.config.orth_reg_weight = weight


def build_adalora(context: MethodContext) -> BuiltMethod:
    """AdaLoRA: init_r = lora_r pruned towards target_r; update_and_allocate runs every optimizer step."""
    from peft import AdaLoraConfig, get_peft_model

    arguments = context.arguments
    target_r = arguments.adalora_target_r or max(1, arguments.lora_r // 2)
    schedule = adalora_schedule(arguments, context.total_steps)
    config = AdaLoraConfig(
        init_r=arguments.lora_r,
        target_r=target_r,
        deltaT=arguments.adalora_delta_t,
        lora_alpha=arguments.lora_alpha,
        lora_dropout=arguments.lora_dropout,
        target_modules=target_modules_option(arguments),
        task_type=context.task_type,
        **schedule,
    )
    model = get_peft_model(context.model, config)
    return BuiltMethod(
        model,
        callbacks=[AdaLoraCallback(arguments)],
        loss_context=OrthogonalRegulariserScale(model),
        details={"init_r": arguments.lora_r, "target_r": target_r, "orth_reg_weight": config.orth_reg_weight, **schedule},
    )
