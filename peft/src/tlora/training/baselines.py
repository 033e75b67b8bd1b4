"""The baselines with a data-driven initialisation (LoRA-GA, CorDA, EVA), each through PEFT's reference
implementation, and the workarounds those implementations need in the training core:

* LoRA-GA: PEFT silently falls back to the default initialisation for a module whose gradient never arrived
  (`check_loraga_gradients` refuses that);
* CorDA: PEFT keeps every module's full `U` and `V` in host memory before cropping any
  (`preprocess_corda_module_by_module` crops each module's `module.eigens` right after its SVD), and only rank 0
  computes them (`share_corda_eigens` broadcasts them);
* EVA: PEFT's loop over the calibration set has no bound (`BoundedEvaForward` marks every `SVDHook.converged` after
  a number of passes), its batches must hold r x rho tokens (`check_eva_batches`), and every rank must derive the
  same rank pattern (`check_rank_pattern_across_ranks`).

AdaLoRA's own machinery is in `adalora.py`; the method registry is `tlora.methods_table`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from peft import LoraConfig, get_peft_model

from .. import distributed
from .methods import (
    BuiltMethod,
    MethodContext,
    device_of,
    lora_config,
    model_inputs,
    progress,
    require_calibration,
    save_initial_adapter,
)

logger = logging.getLogger(__name__)


def check_loraga_gradients(model: torch.nn.Module, config: LoraConfig) -> None:
    """Raise when a target module received no gradient in `preprocess_loraga` (PEFT would silently fall back to the
    default initialisation for it)."""
    from peft.tuners.lora.loraga import get_target_modules

    missing = [name for name, module in get_target_modules(model, config) if not hasattr(module, "_peft_loraga_grad")]
    if missing:
        raise RuntimeError(
            f"LoRA-GA received no gradient for {len(missing)} target modules (e.g. {missing[:3]}); they are not used "
            "by the loss. Remove them from --target_modules."
        )


def build_loraga(context: MethodContext) -> BuiltMethod:
    """LoRA-GA: A and B from the SVD of the full gradient averaged over the calibration set."""
    from peft import LoraGAConfig, preprocess_loraga

    calibration = require_calibration(context)
    arguments = context.arguments
    config = lora_config(
        context,
        init_lora_weights="lora_ga",
        lora_ga_config=LoraGAConfig(direction=arguments.loraga_direction, scale=arguments.loraga_scale),
    )
    model = context.model
    device = device_of(model)
    loader = calibration.loader(arguments.calibration_batch_size)

    def train_step() -> None:
        for batch in progress(loader, "LoRA-GA gradients", context.is_main_process):
            model(**model_inputs(batch, device)).loss.backward()

    start = time.perf_counter()
    preprocess_loraga(model, config, train_step)
    check_loraga_gradients(model, config)
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
    device = device_of(model)
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

    calibration = require_calibration(context)
    config = lora_config(
        context, init_lora_weights="corda", corda_config=CordaConfig(corda_method=context.arguments.corda_method)
    )
    model = context.model
    device = device_of(model)
    loader = calibration.loader(1)  # CorDA's hooks squeeze the batch dimension and would count padding rows

    def run_model() -> None:
        for batch in progress(loader, "CorDA covariance", context.is_main_process):
            model(**model_inputs(batch, device, labels=False))

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


class BoundedEvaForward:
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

    calibration = require_calibration(context)
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
    forward = BoundedEvaForward(arguments.eva_max_passes * len(loader))
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
