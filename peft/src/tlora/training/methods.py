"""The method table: every fine-tuning method the paper compares, each through its reference implementation.

One entry per method. A builder takes the base model (on its training device), the parsed arguments and the shared
calibration set, and returns the model to train plus what the trainer needs besides it (an optimizer factory,
callbacks) and what the final save needs (the initial adapter of methods that modify the base weights).

| method   | implementation                                                                                  |
|----------|-------------------------------------------------------------------------------------------------|
| full     | every parameter trains                                                                          |
| lora     | `LoraConfig`                                                                                    |
| adalora  | `AdaLoraConfig`; `update_and_allocate` every optimizer step from `AdaLoraCallback`              |
| loraplus | `LoraConfig` + `peft.optimizers.create_loraplus_optimizer`                                      |
| dora     | `LoraConfig(use_dora=True)`                                                                     |
| olora    | `LoraConfig(init_lora_weights="olora")`              (modifies the base weights)               |
| pissa    | `LoraConfig(init_lora_weights="pissa" / "pissa_niter_N")` (modifies the base weights)          |
| loraga   | `LoraGAConfig` + `preprocess_loraga`, calibration set (modifies the base weights)              |
| corda    | `CordaConfig` + `preprocess_corda`, calibration set at batch size 1 (modifies the base weights) |
| eva      | `EvaConfig` + `initialize_lora_eva_weights`, calibration set, bounded number of passes          |
| tlora    | `tlora.get_tlora_model`, calibration set; `A` frozen                                            |
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import TrainingArguments

from .arguments import MethodArguments
from .callbacks import AdaLoraCallback, TLoRAGuardCallback
from .data import CalibrationSet

logger = logging.getLogger(__name__)

INITIAL_ADAPTER_DIR = "initial_adapter"
TLORA_INIT_FILE = "tlora_init.safetensors"
BASE_MODIFYING_METHODS = ("olora", "pissa", "loraga", "corda")
CALIBRATED_METHODS = ("loraga", "corda", "eva", "tlora")


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


def _target_modules(arguments: MethodArguments):
    targets = arguments.target_modules
    return targets[0] if targets == ["all-linear"] else list(targets)


def _lora_fields(context: MethodContext) -> dict[str, Any]:
    """The LoRA fields every LoRA-family method shares (same r, alpha, dropout, targets and task type)."""
    arguments = context.arguments
    return {
        "r": arguments.lora_r,
        "lora_alpha": arguments.lora_alpha,
        "lora_dropout": arguments.lora_dropout,
        "target_modules": _target_modules(arguments),
        "task_type": context.task_type,
    }


def lora_config(context: MethodContext, **overrides: Any) -> LoraConfig:
    """The `LoraConfig` every LoRA-family method starts from (same r, alpha, dropout and targets)."""
    return LoraConfig(**_lora_fields(context), **overrides)


def _require_calibration(context: MethodContext) -> CalibrationSet:
    if context.calibration is None:
        raise ValueError(f"method {context.arguments.method!r} needs a calibration set")
    return context.calibration


def _model_inputs(batch: dict[str, torch.Tensor], device: torch.device, labels: bool = True) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items() if labels or k != "labels"}


def _device_of(model: torch.nn.Module) -> torch.device:
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


def build_loraplus(context: MethodContext) -> BuiltMethod:
    """LoRA+: plain LoRA whose B matrices learn loraplus_lr_ratio times faster (PEFT's optimizer)."""
    from peft.optimizers import create_loraplus_optimizer
    from transformers import Trainer

    ratio = context.arguments.loraplus_lr_ratio

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


def _schedule_steps(value: float, total: int) -> int:
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


def build_adalora(context: MethodContext) -> BuiltMethod:
    """AdaLoRA: init_r = lora_r pruned towards target_r; update_and_allocate runs every optimizer step."""
    from peft import AdaLoraConfig

    arguments = context.arguments
    target_r = arguments.adalora_target_r or max(1, arguments.lora_r // 2)
    schedule = adalora_schedule(arguments, context.total_steps)
    config = AdaLoraConfig(
        init_r=arguments.lora_r,
        target_r=target_r,
        deltaT=arguments.adalora_delta_t,
        lora_alpha=arguments.lora_alpha,
        lora_dropout=arguments.lora_dropout,
        target_modules=_target_modules(arguments),
        task_type=context.task_type,
        **schedule,
    )
    model = get_peft_model(context.model, config)
    callback = AdaLoraCallback(arguments)
    return BuiltMethod(model, callbacks=[callback], details={"init_r": arguments.lora_r, "target_r": target_r, **schedule})


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


def build_loraga(context: MethodContext) -> BuiltMethod:
    """LoRA-GA: A and B from the SVD of the full gradient averaged over the calibration set."""
    from peft import LoraGAConfig, preprocess_loraga
    from peft.tuners.lora.loraga import get_target_modules

    calibration = _require_calibration(context)
    arguments = context.arguments
    config = lora_config(
        context,
        init_lora_weights="lora_ga",
        lora_ga_config=LoraGAConfig(direction=arguments.loraga_direction, scale=arguments.loraga_scale),
    )
    model = context.model
    device = _device_of(model)
    loader = calibration.loader(arguments.calibration_batch_size)

    def train_step() -> None:
        for batch in _progress(loader, "LoRA-GA gradients", context.is_main_process):
            model(**_model_inputs(batch, device)).loss.backward()

    start = time.perf_counter()
    preprocess_loraga(model, config, train_step)
    # PEFT silently falls back to the default initialisation for a module whose gradient never arrived.
    missing = [name for name, module in get_target_modules(model, config) if not hasattr(module, "_peft_loraga_grad")]
    if missing:
        raise RuntimeError(
            f"LoRA-GA received no gradient for {len(missing)} target modules (e.g. {missing[:3]}); they are not used "
            "by the loss. Remove them from --target_modules."
        )
    peft_model = get_peft_model(model, config)
    seconds = time.perf_counter() - start
    return BuiltMethod(
        peft_model,
        initial_adapter_dir=save_initial_adapter(context, peft_model),
        calibration_seconds=seconds,
        details={"direction": arguments.loraga_direction, "scale": arguments.loraga_scale},
    )


def build_corda(context: MethodContext) -> BuiltMethod:
    """CorDA: A and B from the SVD of W times the input covariance of the calibration set (batch size 1)."""
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    calibration = _require_calibration(context)
    config = lora_config(
        context, init_lora_weights="corda", corda_config=CordaConfig(corda_method=context.arguments.corda_method)
    )
    model = context.model
    device = _device_of(model)
    loader = calibration.loader(1)  # CorDA's hooks squeeze the batch dimension

    def run_model() -> None:
        for batch in _progress(loader, "CorDA covariance", context.is_main_process):
            model(**_model_inputs(batch, device, labels=False))

    start = time.perf_counter()
    preprocess_corda(model, config, run_model=run_model)
    peft_model = get_peft_model(model, config)
    seconds = time.perf_counter() - start
    return BuiltMethod(
        peft_model,
        initial_adapter_dir=save_initial_adapter(context, peft_model),
        calibration_seconds=seconds,
        details={"corda_method": context.arguments.corda_method, "calibration_batch_size": 1},
    )


class _BoundedEvaForward:
    """EVA's forward_fn, counting calls; after `limit` calls it declares every component converged so that PEFT's
    otherwise unbounded loop stops and uses the components it has."""

    def __init__(self, limit: int):
        self.limit = limit
        self.calls = 0
        self.stopped_early = False

    def __call__(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> Any:
        from peft.tuners.lora.eva import SVDHook

        output = model(**inputs)
        self.calls += 1
        if self.calls >= self.limit:
            for module in model.modules():
                for hook in module._forward_hooks.values():
                    if isinstance(hook, SVDHook) and not bool(hook.converged.all()):
                        hook.converged = torch.ones_like(hook.converged)
                        self.stopped_early = True
        return output


def build_eva(context: MethodContext) -> BuiltMethod:
    """EVA: A from an incremental SVD of the layer inputs on the calibration set; ranks redistributed by rho."""
    from peft import EvaConfig, initialize_lora_eva_weights

    calibration = _require_calibration(context)
    arguments = context.arguments
    # EVA masks tokens by `labels != -100`, which only makes sense for token labels: with one label per sample
    # (sequence classification) the attention mask alone selects the tokens.
    token_labels = str(context.task_type) not in ("SEQ_CLS", "TaskType.SEQ_CLS")
    config = lora_config(
        context,
        init_lora_weights="eva",
        eva_config=EvaConfig(rho=arguments.eva_rho, tau=arguments.eva_tau, use_label_mask=token_labels),
    )
    loader = calibration.loader(arguments.calibration_batch_size)
    forward = _BoundedEvaForward(arguments.eva_max_passes * len(loader))
    start = time.perf_counter()
    model = get_peft_model(context.model, config, low_cpu_mem_usage=True)
    initialize_lora_eva_weights(
        model,
        loader,
        forward_fn=forward,
        gather_distributed_inputs=False,  # every rank iterates all calibration samples
        show_progress_bar=context.is_main_process,
    )
    seconds = time.perf_counter() - start
    if forward.stopped_early:
        logger.warning(
            "EVA did not converge within %d passes over the calibration samples (tau=%g); using its components as "
            "they are.", arguments.eva_max_passes, arguments.eva_tau,
        )
    return BuiltMethod(
        model,
        calibration_seconds=seconds,
        details={
            "rho": arguments.eva_rho,
            "tau": arguments.eva_tau,
            "forward_calls": forward.calls,
            "converged": not forward.stopped_early,
            "rank_pattern": dict(model.peft_config["default"].rank_pattern or {}),
        },
    )


def tlora_config(context: MethodContext):
    """The `TLoRAConfig` of this run."""
    from .. import TLoRAConfig

    arguments = context.arguments
    return TLoRAConfig(
        **_lora_fields(context),
        rank_budget=arguments.rank_budget,
        parameter_budget=arguments.parameter_budget,
        min_rank=arguments.min_rank,
        allocate_scales=arguments.allocate_scales,
        sensitivity=arguments.sensitivity,
        svd_method=arguments.svd_method,
        statistics_device=arguments.statistics_device,
    )


def base_weights_fingerprint(model: torch.nn.Module, config) -> str:
    """A digest of the target weights of the base model (names, shapes, strided samples of the values)."""
    import hashlib

    from ..targets import find_target_modules, weight_fingerprint

    digest = hashlib.sha256()
    for target in find_target_modules(model, config):
        digest.update(target.name.encode())
        digest.update(weight_fingerprint(target.module.weight).encode())
    return digest.hexdigest()


def _load_initial_A(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, dict(handle.metadata() or {})


def build_tlora(context: MethodContext) -> BuiltMethod:
    """TLoRA: calibrate, allocate ranks and scales, A from the SVD of W C (frozen), B = 0.

    The plan and the initial A are written to output_dir (tlora_plan.json, tlora_init.safetensors, the latter with a
    fingerprint of the base weights); a resumed run rebuilds the same adapter from them without calibrating again.
    """
    from safetensors.torch import save_file

    from .. import TLoRAPlan, apply_plan, distributed, format_plan_table, get_tlora_model, write_plan_reports
    from ..initialization import digest_lora_A
    from ..plan_report import PLAN_JSON

    config = tlora_config(context)
    plan_path = context.output_dir / PLAN_JSON
    init_path = context.output_dir / TLORA_INIT_FILE
    fingerprint = base_weights_fingerprint(context.model, config)
    start = time.perf_counter()
    if context.resume:
        if not (plan_path.is_file() and init_path.is_file()):
            raise FileNotFoundError(
                f"resuming a tlora run needs {plan_path.name} and {init_path.name} in {context.output_dir} (written "
                "by the run that made the checkpoint); without them A cannot be rebuilt bit for bit"
            )
        plan = TLoRAPlan.load(plan_path)
        lora_A, metadata = _load_initial_A(init_path)
        if metadata.get("base_fingerprint") not in (None, fingerprint):
            raise ValueError(
                f"{init_path} was computed for other base weights than {context.model.name_or_path!r}; resume with "
                "the base model of the original run"
            )
        distributed.check_identical_across_ranks(plan.to_json().encode() + digest_lora_A(lora_A), "the TLoRA plan and A")
        model = apply_plan(context.model, plan, lora_A, config)
        logger.info("Rebuilt the TLoRA adapter from %s and %s (no calibration).", plan_path, init_path)
        calibrated = False
    else:
        calibration = _require_calibration(context)
        model = get_tlora_model(
            context.model,
            config,
            calibration.loader(context.arguments.calibration_batch_size),
            statistics_cache=context.arguments.statistics_cache,
            calibration_seed=calibration.seed,
            show_progress=context.is_main_process,
        )
        plan = model.base_model.tlora_plan()
        lora_A = {
            name: layer.lora_A["default"].weight.detach().to(device="cpu", dtype=torch.float32).contiguous()
            for name, layer in model.base_model.lora_layers("default").items()
        }
        if context.is_main_process:
            write_plan_reports(plan, context.output_dir)
            metadata = {"format": "tlora-initial-A", "digest": digest_lora_A(lora_A).hex(), "base_fingerprint": fingerprint}
            save_file(lora_A, str(init_path), metadata=metadata)
        calibrated = True
    seconds = time.perf_counter() - start
    if context.is_main_process:
        logger.info("TLoRA plan:\n%s", format_plan_table(plan))
    return BuiltMethod(
        model,
        callbacks=[TLoRAGuardCallback(lora_A, plan)],
        plan=plan,
        calibration_seconds=seconds if calibrated else 0.0,
        details={
            "lora_A_digest": digest_lora_A(lora_A).hex(),
            "base_fingerprint": fingerprint,
            "total_rank": plan.total_rank,
            "plan_trainable_parameters": plan.trainable_parameters,
            "lora_trainable_parameters": plan.lora_trainable_parameters,
            "dropped_modules": plan.dropped_modules,
            "rebuilt_from_output_dir": not calibrated,
        },
    )


def _progress(iterable, description: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=description, unit="batch", disable=not enabled)


METHOD_BUILDERS: dict[str, Callable[[MethodContext], BuiltMethod]] = {
    "full": build_full,
    "lora": build_lora,
    "adalora": build_adalora,
    "loraplus": build_loraplus,
    "dora": build_dora,
    "olora": build_olora,
    "pissa": build_pissa,
    "loraga": build_loraga,
    "corda": build_corda,
    "eva": build_eva,
    "tlora": build_tlora,
}


def build_method(context: MethodContext) -> BuiltMethod:
    """Look the method up in the table and build it."""
    try:
        builder = METHOD_BUILDERS[context.arguments.method]
    except KeyError:
        raise ValueError(f"unknown method {context.arguments.method!r}; choose from {sorted(METHOD_BUILDERS)}") from None
    return builder(context)
