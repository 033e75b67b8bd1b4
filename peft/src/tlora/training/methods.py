"""The method table: every fine-tuning method the paper compares, each through its reference implementation.

One entry per method. A builder takes the base model (on its training device), the parsed arguments and the shared
calibration set, and returns the model to train plus what the trainer needs besides it (an optimizer factory,
callbacks) and what the final save needs (the initial adapter of methods that modify the base weights).

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

import copy
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ContextManager, Optional

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import TrainingArguments

from .. import (
    TLoRAConfig,
    TLoRAPlan,
    apply_plan,
    distributed,
    find_target_modules,
    format_plan_table,
    get_tlora_model,
    write_plan_reports,
)
from ..constants import INITIAL_ADAPTER_DIR, PLAN_FILE, TLORA_INIT_FILE
from ..initialization import digest_lora_A
from ..model import modules_fingerprint
from ..outputs import atomic_save_safetensors
from .adalora import AdaLoraCallback, OrthogonalRegulariserScale, adalora_schedule
from .arguments import MethodArguments
from .callbacks import TLoRAGuardCallback
from .data import CalibrationSet

logger = logging.getLogger(__name__)

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
    # entered around each micro-batch's loss: (trainer, num_items_in_batch) -> context manager
    loss_context: Optional[Callable[[Any, Any], ContextManager[None]]] = None


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
    return BuiltMethod(
        model,
        callbacks=[AdaLoraCallback(arguments)],
        loss_context=OrthogonalRegulariserScale(model),
        details={"init_r": arguments.lora_r, "target_r": target_r, "orth_reg_weight": config.orth_reg_weight, **schedule},
    )


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


def share_corda_eigens(model: torch.nn.Module, config: LoraConfig) -> str:
    """Give every rank rank 0's CorDA eigens (`S`, `U`, `V` of each target module, already cropped to the rank) and
    return their digest; the other ranks receive them in place of computing them."""
    from peft.tuners.lora.corda import CordaEigens, target_modules

    rank, _ = distributed.rank_and_world_size()
    device = _device_of(model)
    digest = hashlib.sha256()
    for name, module in target_modules(model, config):
        if rank != 0:
            out_features, in_features = module.weight.shape
            module.eigens = CordaEigens(
                S_WC=torch.zeros(config.r, device=device),
                U_WC=torch.zeros(out_features, config.r, device=device),
                V_WC=torch.zeros(in_features, config.r, device=device),
            )
        for tensor in (module.eigens.S_WC, module.eigens.U_WC, module.eigens.V_WC):
            distributed.broadcast_(tensor, src=0)
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
        digest.update(name.encode())
    return digest.hexdigest()


def preprocess_corda_module_by_module(model: torch.nn.Module, config: LoraConfig, run_model: Callable[[], None]) -> None:
    """PEFT's `preprocess_corda`, stage by stage through PEFT's own functions, except that each module's eigens are
    cropped to its rank right after its SVD. PEFT's `collect_eigens` keeps every module's full `U` and `V` in host
    memory before `crop_corda_eigens` crops any (about 41 GB at 7B); here one module's are alive at a time."""
    from peft.tuners.lora.corda import calib_cov_distribution, collect_eigens_for_layer, crop_corda_eigens, target_modules
    from peft.utils.other import get_pattern_key

    calib_cov_distribution(model, config, run_model, None, None)
    for name, module in list(target_modules(model, config)):
        module.corda_method = config.corda_config.corda_method
        module.rank = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), name), config.r)
        module.eigens = collect_eigens_for_layer(module, config)
        this_module = copy.copy(config)
        this_module.target_modules = {name}  # an exact module name: crop_corda_eigens crops this module only
        crop_corda_eigens(model, this_module)
        if config.corda_config.prune_temporary_fields:
            for temporary in ("sample_count", "covariance_matrix", "corda_method", "rank"):
                if hasattr(module, temporary):
                    delattr(module, temporary)


def build_corda(context: MethodContext) -> BuiltMethod:
    """CorDA: A and B from the SVD of W times the input covariance of the calibration set (batch size 1, so no padding
    row enters the covariance: CorDA's hooks ignore the attention mask). Computed once, on rank 0, module by module
    (see `preprocess_corda_module_by_module`); the other ranks receive rank 0's eigens."""
    from peft.tuners.lora.config import CordaConfig

    calibration = _require_calibration(context)
    config = lora_config(
        context, init_lora_weights="corda", corda_config=CordaConfig(corda_method=context.arguments.corda_method)
    )
    model = context.model
    device = _device_of(model)
    loader = calibration.loader(1)  # CorDA's hooks squeeze the batch dimension and would count padding rows

    def run_model() -> None:
        for batch in _progress(loader, "CorDA covariance", context.is_main_process):
            model(**_model_inputs(batch, device, labels=False))

    start = time.perf_counter()
    if distributed.rank_and_world_size()[0] == 0:
        preprocess_corda_module_by_module(model, config, run_model)
    digest = share_corda_eigens(model, config)
    peft_model = get_peft_model(model, config)
    seconds = time.perf_counter() - start
    return BuiltMethod(
        peft_model,
        initial_adapter_dir=save_initial_adapter(context, peft_model),
        calibration_seconds=seconds,
        details={"corda_method": context.arguments.corda_method, "calibration_batch_size": 1, "eigens_digest": digest},
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


def check_rank_pattern_across_ranks(rank_pattern: dict[str, int], method: str) -> None:
    """Raise on every rank unless each rank's rank pattern is rank 0's, naming the modules that differ here."""
    reference = distributed.broadcast_json(rank_pattern, src=0)
    differing = sorted(name for name in set(rank_pattern) | set(reference) if rank_pattern.get(name) != reference.get(name))
    try:
        distributed.check_identical_across_ranks(json.dumps(rank_pattern, sort_keys=True).encode(), f"{method}'s ranks")
    except RuntimeError:
        rank = distributed.rank_and_world_size()[0]
        raise RuntimeError(
            f"{method}: the ranks derived different rank patterns (rank {rank} differs from rank 0 at "
            f"{len(differing)} modules, e.g. {differing[:3]}); every rank must see the same calibration batches and "
            "weights. Rerun with the same --seed and data on every rank."
        ) from None


def check_eva_batches(loader: Iterable[dict[str, torch.Tensor]], needed: int, token_labels: bool) -> None:
    """Refuse calibration batches with fewer selected tokens than EVA's largest rank (r x rho): PEFT's incremental
    PCA then fails deep inside with "'IncrementalPCA' object has no attribute 'components_'"."""
    for index, batch in enumerate(loader):
        selected = batch["attention_mask"].bool()
        if token_labels and "labels" in batch:
            selected = selected & (batch["labels"] != -100)
        if int(selected.sum()) < needed:
            raise ValueError(
                f"EVA needs at least r x rho = {needed} tokens per calibration batch, but batch {index} has "
                f"{int(selected.sum())} (labelled) tokens; raise --calibration_batch_size or lower --eva_rho"
            )


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
    check_eva_batches(loader, math.ceil(config.r * arguments.eva_rho), token_labels)
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
    rank_pattern = dict(model.peft_config["default"].rank_pattern or {})
    check_rank_pattern_across_ranks(rank_pattern, "EVA")
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
            "rank_pattern": rank_pattern,
        },
    )


def tlora_config(context: MethodContext):
    """The `TLoRAConfig` of this run."""
    arguments = context.arguments
    return TLoRAConfig(
        **_lora_fields(context),
        rank_budget=arguments.rank_budget,
        parameter_budget=arguments.parameter_budget,
        min_rank=arguments.min_rank,
        max_rank=arguments.max_rank,
        allocate_scales=arguments.allocate_scales,
        sensitivity=arguments.sensitivity,
        svd_method=arguments.svd_method,
        statistics_device=arguments.statistics_device,
    )


def base_weights_fingerprint(model: torch.nn.Module, config) -> str:
    """A digest of the target weights of the base model (names and `tlora.targets.weight_fingerprint` of each)."""
    return modules_fingerprint(model, [target.name for target in find_target_modules(model, config)])


def check_resumed_targets(model: torch.nn.Module, config, plan: TLoRAPlan, plan_path: Path, given: list[str]) -> None:
    """Raise when --target_modules selects other modules than the plan of the run being resumed."""
    selected = [target.name for target in find_target_modules(model, config)]
    planned = [module.name for module in plan.modules]
    if set(selected) == set(planned):
        return
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in planned})
    only_plan, only_given = sorted(set(planned) - set(selected)), sorted(set(selected) - set(planned))
    raise ValueError(
        f"--target_modules {','.join(given)} differs from the targets of the checkpoint's run: its plan ({plan_path}) "
        f"adapts {len(planned)} modules of types {','.join(suffixes)}, these targets select {len(selected)} "
        f"(only in the plan: {only_plan[:2]}, only here: {only_given[:2]}). Resume with the original run's targets, "
        f"e.g. --target_modules {','.join(suffixes)}"
    )


def _load_initial_A(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, dict(handle.metadata() or {})


def build_tlora(context: MethodContext) -> BuiltMethod:
    """TLoRA: calibrate, allocate ranks and scales, A from the SVD of W C (frozen), B = 0.

    The plan and the initial A are written to output_dir (tlora_plan.json, tlora_init.safetensors, the latter with a
    fingerprint of the base weights); a resumed run rebuilds the same adapter from them without calibrating again.
    """
    config = tlora_config(context)
    plan_path = context.output_dir / PLAN_FILE
    init_path = context.output_dir / TLORA_INIT_FILE
    start = time.perf_counter()
    if context.resume:
        if not (plan_path.is_file() and init_path.is_file()):
            raise FileNotFoundError(
                f"resuming a tlora run needs {plan_path.name} and {init_path.name} in {context.output_dir} (written "
                "by the run that made the checkpoint); without them A cannot be rebuilt bit for bit"
            )
        plan = TLoRAPlan.load(plan_path)
        check_resumed_targets(context.model, config, plan, plan_path, context.arguments.target_modules)
        fingerprint = base_weights_fingerprint(context.model, config)
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
        fingerprint = base_weights_fingerprint(context.model, config)
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
            atomic_save_safetensors(lora_A, init_path, metadata=metadata)
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
            "base_quantized": bool(getattr(context.model, "is_quantized", False)),
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
