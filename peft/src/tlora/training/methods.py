"""The method builders and what they share: every fine-tuning method the paper compares, each through its reference
implementation.

A builder takes the base model (on its training device), the parsed arguments and the shared calibration set, and
returns the model to train plus what the trainer needs besides it (an optimizer factory, callbacks) and what the final
save needs (the initial adapter of methods that modify the base weights). Which methods exist, and which builder each
uses, is the registry's (`tlora.methods_table`, resolved by `registry.py`); AdaLoRA's builder is in `adalora.py`, the
data-driven baselines' (LoRA-GA, CorDA, EVA) and their PEFT workarounds in `baselines.py`.

| method   | implementation                                                                                  |
|----------|-------------------------------------------------------------------------------------------------|
| full     | every parameter trains                                                                          |
| lora     | `LoraConfig`                                                                                    |
| adalora  | `AdaLoraConfig`; `update_and_allocate` every step, regulariser weight kept (see `adalora.py`)   |
| loraplus | `LoraConfig` + `peft.optimizers.create_loraplus_optimizer` (no DeepSpeed `optimizer` block)     |
| dora     | `LoraConfig(use_dora=True)`                                                                     |
| olora    | `LoraConfig(init_lora_weights="olora")`              (modifies the base weights)               |
| pissa    | `LoraConfig(init_lora_weights="pissa" / "pissa_niter_N")` (modifies the base weights)          |
| loraga   | `LoraGAConfig` + `preprocess_loraga`, calibration set (modifies the base weights)              |
| corda    | `CordaConfig` + `preprocess_corda` on rank 0, batch size 1, no padding (modifies the base)      |
| eva      | `EvaConfig` + `initialize_lora_eva_weights`, bounded passes, ranks checked against rank 0       |
| tlora    | `tlora.get_tlora_model`, calibration set; `A` frozen                                            |
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ContextManager, Optional

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import TrainingArguments

from .. import TLoRAConfig, format_plan_table, resume
from ..constants import INITIAL_ADAPTER_DIR
from .arguments import MethodArguments, tlora_options
from .callbacks import TLoRAGuardCallback
from .data import CalibrationSet

logger = logging.getLogger(__name__)


@dataclass
class MethodContext:
    """Everything a method builder may use."""

    model: torch.nn.Module
    arguments: MethodArguments
    training_args: TrainingArguments
    task_type: TaskType
    calibration: Optional[CalibrationSet]
    output_dir: Path
    total_steps: int
    resume: bool = False
    is_main_process: bool = True


@dataclass
class BuiltMethod:
    """A model ready to train, and what the trainer and the final save need besides it."""

    model: torch.nn.Module
    optimizer_factory: Optional[Callable[[torch.nn.Module, TrainingArguments], torch.optim.Optimizer]] = None
    callbacks: list = field(default_factory=list)
    initial_adapter_dir: Optional[Path] = None
    plan: Any = None
    details: dict[str, Any] = field(default_factory=dict)
    calibration_seconds: float = 0.0
    # entered around each micro-batch's loss: (trainer, num_items_in_batch) -> context manager
    loss_context: Optional[Callable[[Any, Any], ContextManager[None]]] = None


def target_modules_option(arguments: MethodArguments):
    """--target_modules as PEFT takes it: the string 'all-linear' or a list of names."""
    targets = arguments.target_modules
    return targets[0] if targets == ["all-linear"] else list(targets)


def _lora_fields(context: MethodContext) -> dict[str, Any]:
    """The LoRA fields every LoRA-family method shares (same r, alpha, dropout, targets and task type)."""
    arguments = context.arguments
    return {
        "r": arguments.lora_r,
        "lora_alpha": arguments.lora_alpha,
        "lora_dropout": arguments.lora_dropout,
        "target_modules": target_modules_option(arguments),
        "task_type": context.task_type,
    }


def lora_config(context: MethodContext, **overrides: Any) -> LoraConfig:
    """The `LoraConfig` every LoRA-family method starts from (same r, alpha, dropout and targets)."""
    return LoraConfig(**_lora_fields(context), **overrides)


def require_calibration(context: MethodContext) -> CalibrationSet:
    if context.calibration is None:
        raise ValueError(f"method {context.arguments.method!r} needs a calibration set")
    return context.calibration


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device, labels: bool = True) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items() if labels or k != "labels"}


def device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def save_initial_adapter(context: MethodContext, model: PeftModel) -> Path:
    """Save the freshly initialised adapter (with init_lora_weights=True, as PEFT's weight conversion requires)."""
    directory = context.output_dir / INITIAL_ADAPTER_DIR
    config = model.peft_config["default"]
    original = config.init_lora_weights
    config.init_lora_weights = True
    try:
        model.save_pretrained(str(directory), is_main_process=context.is_main_process)
    finally:
        config.init_lora_weights = original
    return directory


# ---------------------------------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------------------------------


def build_full(context: MethodContext) -> BuiltMethod:
    """Full fine-tuning: every parameter trains."""
    context.model.requires_grad_(True)
    return BuiltMethod(context.model)


def build_lora(context: MethodContext) -> BuiltMethod:
    """Plain LoRA (Kaiming A, zero B)."""
    return BuiltMethod(get_peft_model(context.model, lora_config(context)))


def build_dora(context: MethodContext) -> BuiltMethod:
    """DoRA: LoRA with a trained magnitude vector (PEFT's use_dora)."""
    return BuiltMethod(get_peft_model(context.model, lora_config(context, use_dora=True)))


def refuse_deepspeed_optimizer(training_args: TrainingArguments, method: str) -> None:
    """Raise when the DeepSpeed config brings its own optimizer, which would replace the method's optimizer."""
    deepspeed_config = getattr(training_args, "hf_deepspeed_config", None)
    if deepspeed_config is not None and "optimizer" in deepspeed_config.config:
        raise ValueError(
            f"--method {method} builds its own optimizer (per-parameter learning rates), but the DeepSpeed config "
            f"{training_args.deepspeed} has an 'optimizer' block, which DeepSpeed would use instead, silently training "
            "plain LoRA; remove the 'optimizer' block (the Trainer then creates the optimizer from --optim, "
            "--learning_rate and --weight_decay)"
        )


def build_loraplus(context: MethodContext) -> BuiltMethod:
    """LoRA+: plain LoRA whose B matrices learn loraplus_lr_ratio times faster (PEFT's optimizer)."""
    from peft.optimizers import create_loraplus_optimizer
    from transformers import Trainer

    ratio = context.arguments.loraplus_lr_ratio
    refuse_deepspeed_optimizer(context.training_args, "loraplus")

    def optimizer_factory(model: torch.nn.Module, args: TrainingArguments) -> torch.optim.Optimizer:
        optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
        optimizer_kwargs = {k: v for k, v in optimizer_kwargs.items() if k != "lr"}
        return create_loraplus_optimizer(
            model,
            optimizer_cls,
            lr=args.learning_rate,
            loraplus_lr_ratio=ratio,
            loraplus_weight_decay=args.weight_decay,
            **optimizer_kwargs,
        )

    model = get_peft_model(context.model, lora_config(context))
    return BuiltMethod(model, optimizer_factory=optimizer_factory, details={"loraplus_lr_ratio": ratio})


def build_olora(context: MethodContext) -> BuiltMethod:
    """OLoRA: A and B from a QR decomposition of W, which is reduced by their product."""
    model = get_peft_model(context.model, lora_config(context, init_lora_weights="olora"))
    return BuiltMethod(model, initial_adapter_dir=save_initial_adapter(context, model))


def build_pissa(context: MethodContext) -> BuiltMethod:
    """PiSSA: A and B from the top singular vectors of W, which keeps the residual."""
    niter = context.arguments.pissa_niter
    init = "pissa" if niter <= 0 else f"pissa_niter_{niter}"
    model = get_peft_model(context.model, lora_config(context, init_lora_weights=init))
    return BuiltMethod(model, initial_adapter_dir=save_initial_adapter(context, model), details={"init_lora_weights": init})


def tlora_config(context: MethodContext) -> TLoRAConfig:
    """The `TLoRAConfig` of this run: the shared LoRA fields and the TLoRA options (`TLoRAConfig`'s own fields)."""
    return TLoRAConfig(**_lora_fields(context), **tlora_options(context.arguments))


def build_tlora(context: MethodContext) -> BuiltMethod:
    """TLoRA: calibrate, allocate ranks and scales, A from the SVD of W C (frozen), B = 0.

    The plan and the initial A are written to output_dir (tlora_plan.json, tlora_init.safetensors, the latter with a
    fingerprint of the base weights); a resumed run rebuilds the same adapter from them without calibrating again
    (`tlora.resume`).
    """
    config, arguments = tlora_config(context), context.arguments
    start = time.perf_counter()
    if context.resume:
        adapter = resume.rebuild_from_output_dir(context.model, config, context.output_dir, arguments.target_modules)
    else:
        calibration = require_calibration(context)
        adapter = resume.calibrate_and_record(
            context.model,
            config,
            calibration.loader(arguments.calibration_batch_size),
            context.output_dir,
            statistics_cache=arguments.statistics_cache,
            calibration_seed=calibration.seed,
            show_progress=context.is_main_process,
            is_main_process=context.is_main_process,
        )
    seconds = time.perf_counter() - start
    if context.is_main_process:
        logger.info("TLoRA plan:\n%s", format_plan_table(adapter.plan))
    return BuiltMethod(
        adapter.model,
        callbacks=[TLoRAGuardCallback(adapter.lora_A, adapter.plan)],
        plan=adapter.plan,
        calibration_seconds=seconds if adapter.calibrated else 0.0,
        details=tlora_details(context.model, adapter),
    )


def tlora_details(base: torch.nn.Module, adapter: resume.TLoRAAdapter) -> dict[str, Any]:
    """What the run record keeps of a TLoRA build: digests, budget and plan totals."""
    plan = adapter.plan
    return {
        "lora_A_digest": adapter.lora_A_digest,
        "base_fingerprint": adapter.base_fingerprint,
        "base_quantized": bool(getattr(base, "is_quantized", False)),
        "total_rank": plan.total_rank,
        "plan_trainable_parameters": plan.trainable_parameters,
        "lora_trainable_parameters": plan.lora_trainable_parameters,
        "dropped_modules": plan.dropped_modules,
        "rebuilt_from_output_dir": not adapter.calibrated,
    }


def progress(iterable, description: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=description, unit="batch", disable=not enabled)
