"""Export a LoRA adapter with per-module ranks and alphas as a plain LoRA adapter that vLLM serves unmerged.

    python -m tlora.export outputs/math-tlora outputs/math-tlora-vllm          # r: smallest vLLM rank that fits
    python -m tlora.export outputs/math-tlora outputs/math-tlora-vllm --max_lora_rank 128

vLLM's multi-LoRA loader reads `r` and `lora_alpha` from `adapter_config.json` and (in the releases this project
pins) ignores `rank_pattern` / `alpha_pattern`, so every module of a TLoRA adapter would get the scale
`lora_alpha / r`. The export folds each module's own scale s_l into B, B' = B * s_l / s, so that the single scale
s = lora_alpha' / r' of the written configuration is exact, pads every A (rows) and B (columns) with zeros to one
rank r' (a zero row of A times a zero column of B adds nothing), and lists the adapted modules explicitly. Stock
PEFT loads the result without patterns and computes the same outputs; `r'` is a value vLLM accepts as
`max_lora_rank`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Optional

import torch
from peft.utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from peft.utils.other import get_pattern_key
from safetensors import safe_open
from safetensors.torch import save_file

from ..constants import VLLM_EXPORT_FILE

logger = logging.getLogger(__name__)

# vllm/config/lora.py, LoRAConfig: `MaxLoRARanks = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]`.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# The projections vLLM's Llama accepts LoRA weights for (q/k/v are packed into qkv_proj, gate/up into gate_up_proj).
LLAMA_LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
WEIGHT_PREFIX = "base_model.model."
LORA_A_SUFFIX = ".lora_A.weight"
LORA_B_SUFFIX = ".lora_B.weight"
# init_lora_weights values whose adapter only works on a base model PEFT modified when the adapter was created.
BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
# LoraConfig fields that change what the adapter computes beyond `scale * B A x` (value meaning "off" in brackets).
UNSUPPORTED_FEATURES = {
    "use_dora": "DoRA (use_dora)",
    "lora_bias": "a bias on lora_B (lora_bias)",
    "modules_to_save": "fully trained modules (modules_to_save)",
    "trainable_token_indices": "trained token embeddings (trainable_token_indices)",
    "target_parameters": "LoRA on parameters instead of modules (target_parameters)",
    "layer_replication": "layer replication (layer_replication)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
}


class AdapterExportError(ValueError):
    """The adapter cannot be written as a plain LoRA adapter for vLLM."""


class VLLMCompatibilityError(ValueError):
    """An adapter folder that vLLM would refuse or serve with other outputs than PEFT."""


def vllm_max_lora_rank(largest_rank: int, requested: Optional[int] = None) -> int:
    """The `max_lora_rank` to serve a largest module rank with: `requested` if it fits, else the smallest allowed."""
    if requested is not None:
        if requested not in VLLM_MAX_LORA_RANKS:
            raise AdapterExportError(
                f"max_lora_rank {requested} is not one vLLM accepts; use one of {list(VLLM_MAX_LORA_RANKS)}"
            )
        if largest_rank > requested:
            raise AdapterExportError(
                f"the adapter's largest module rank is {largest_rank}, above max_lora_rank {requested}; pass a "
                f"larger --max_lora_rank, or retrain with TLoRAConfig(max_rank={requested}) (--max_rank)"
            )
        return requested
    for allowed in VLLM_MAX_LORA_RANKS:
        if allowed >= largest_rank:
            return allowed
    raise AdapterExportError(
        f"the adapter's largest module rank is {largest_rank}, above vLLM's largest max_lora_rank "
        f"{VLLM_MAX_LORA_RANKS[-1]}; retrain with TLoRAConfig(max_rank=...) (--max_rank) to cap the ranks, or merge "
        "the adapter (the evaluation's default)"
    )


def read_adapter(adapter_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, str]]:
    """The configuration, tensors and safetensors metadata of a saved PEFT adapter (safetensors only)."""
    adapter_dir = Path(adapter_dir)
    config_path, weights_path = adapter_dir / CONFIG_NAME, adapter_dir / SAFETENSORS_WEIGHTS_NAME
    if not config_path.is_file():
        raise AdapterExportError(f"{adapter_dir} holds no {CONFIG_NAME}; pass the folder of a saved PEFT adapter")
    if not weights_path.is_file():
        raise AdapterExportError(
            f"{adapter_dir} holds no {SAFETENSORS_WEIGHTS_NAME} (pickled .bin weights are not read); re-save the "
            "adapter with save_pretrained(..., safe_serialization=True)"
        )
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise AdapterExportError(f"{config_path} is not valid JSON ({error}); re-save the adapter") from error
    with safe_open(str(weights_path), framework="pt", device="cpu") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        metadata = dict(handle.metadata() or {})
    return config, tensors, metadata


def check_plain_lora(config: dict, adapter_dir: str | Path) -> None:
    """Refuse adapters that are more than `scale * B A x` on an unmodified base model."""
    if config.get("peft_type") != "LORA":
        raise AdapterExportError(f"{adapter_dir} is a {config.get('peft_type')} adapter; only LORA adapters export")
    used = [label for key, label in UNSUPPORTED_FEATURES.items() if config.get(key)]
    if config.get("bias", "none") != "none":
        used.append(f"trained biases (bias={config['bias']!r})")
    if used:
        raise AdapterExportError(
            f"{adapter_dir} uses {', '.join(used)}, which vLLM does not serve as LoRA; merge the adapter instead "
            "(evaluate without --serve_adapter)"
        )
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_MODIFYING_INITS):
        raise AdapterExportError(
            f"{adapter_dir} has init_lora_weights={init!r}: it applies to a base model PEFT modified, not to the "
            "original one vLLM loads; save it converted (save_pretrained(path_initial_model_for_weight_conversion="
            "...), as the training scripts do) or merge it"
        )


def module_weights(tensors: dict[str, torch.Tensor], adapter_dir: str | Path) -> dict[str, tuple]:
    """Module name -> (A, B) from the saved tensors; any other tensor is refused."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        suffix = LORA_A_SUFFIX if key.endswith(LORA_A_SUFFIX) else LORA_B_SUFFIX if key.endswith(LORA_B_SUFFIX) else None
        if suffix is None or not key.startswith(WEIGHT_PREFIX) or tensor.dim() != 2:
            raise AdapterExportError(
                f"{adapter_dir}: tensor {key} (shape {tuple(tensor.shape)}) is not the 2-D lora_A / lora_B weight of a "
                "linear layer; only plain LoRA on linear layers exports (merge the adapter otherwise)"
            )
        pairs.setdefault(key[len(WEIGHT_PREFIX) : -len(suffix)], {})[suffix] = tensor
    weights = {}
    for name, pair in pairs.items():
        if set(pair) != {LORA_A_SUFFIX, LORA_B_SUFFIX}:
            raise AdapterExportError(f"{adapter_dir}: module {name} has only one of lora_A and lora_B; re-save it")
        lora_A, lora_B = pair[LORA_A_SUFFIX], pair[LORA_B_SUFFIX]
        if lora_A.shape[0] != lora_B.shape[1]:
            raise AdapterExportError(
                f"{adapter_dir}: module {name} has A {tuple(lora_A.shape)} and B {tuple(lora_B.shape)} of different ranks"
            )
        weights[name] = (lora_A, lora_B)
    return weights


def _scale(alpha: float, rank: int, rslora: bool) -> float:
    """PEFT's scaling of a module: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / (math.sqrt(rank) if rslora else rank)


def module_scaling(config: dict, name: str, rank: int, adapter_dir: str | Path) -> float:
    """The scaling PEFT gives module `name` (rank_pattern / alpha_pattern matched as peft's get_pattern_key does)."""
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    configured_rank = rank_pattern.get(get_pattern_key(rank_pattern.keys(), name), config["r"])
    if configured_rank != rank:
        raise AdapterExportError(
            f"{adapter_dir}: module {name} has rank {rank} in its weights but {configured_rank} in {CONFIG_NAME}; "
            "the configuration does not belong to these weights"
        )
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), name), config["lora_alpha"])
    return _scale(alpha, rank, bool(config.get("use_rslora")))


def fold_and_pad(lora_A: torch.Tensor, lora_B: torch.Tensor, factor: float, rank: int) -> tuple:
    """(A padded with zero rows, B * factor padded with zero columns), both of rank `rank`, in their own dtypes."""
    compute = torch.promote_types(lora_B.dtype, torch.float32)
    padded_A = lora_A.new_zeros((rank, lora_A.shape[1]))
    padded_A[: lora_A.shape[0]] = lora_A
    padded_B = lora_B.new_zeros((lora_B.shape[0], rank))
    padded_B[:, : lora_B.shape[1]] = (lora_B.to(compute) * factor).to(lora_B.dtype)
    return padded_A.contiguous(), padded_B.contiguous()


def exported_config(config: dict, names: Sequence[str], rank: int, scaling: float) -> dict:
    """The plain LoRA configuration: one r and lora_alpha (lora_alpha / r = scaling), explicit modules, no patterns."""
    lora_alpha = scaling * rank
    plain = dict(config)
    plain.update(
        r=rank,
        lora_alpha=int(round(lora_alpha)) if math.isclose(lora_alpha, round(lora_alpha), rel_tol=1e-12) else lora_alpha,
        rank_pattern={},
        alpha_pattern={},
        use_rslora=False,
        target_modules=list(names),
        exclude_modules=None,
        layers_to_transform=None,
        layers_pattern=None,
    )
    return plain


def export_for_vllm(adapter_dir: str | Path, out_dir: str | Path, max_lora_rank: Optional[int] = None) -> Path:
    """Write `adapter_dir` (a PEFT LoRA adapter, patterns allowed) to `out_dir` as a plain LoRA adapter for vLLM."""
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if out_dir.resolve() == adapter_dir.resolve():
        raise AdapterExportError(f"write the export to another folder than the adapter itself ({adapter_dir})")
    config, tensors, metadata = read_adapter(adapter_dir)
    check_plain_lora(config, adapter_dir)
    weights = {name: pair for name, pair in module_weights(tensors, adapter_dir).items() if pair[0].shape[0] > 0}
    if not weights:
        raise AdapterExportError(f"{adapter_dir} holds no lora_A / lora_B weights of rank > 0; nothing to serve")
    largest = max(lora_A.shape[0] for lora_A, _ in weights.values())
    rank = vllm_max_lora_rank(largest, max_lora_rank)
    # The one scale the written configuration realises: the adapter's nominal one, so unpatterned modules keep B.
    scaling = _scale(config["lora_alpha"], config["r"], bool(config.get("use_rslora")))
    exported, modules = {}, {}
    for name, (lora_A, lora_B) in weights.items():
        module_scale = module_scaling(config, name, lora_A.shape[0], adapter_dir)
        padded_A, padded_B = fold_and_pad(lora_A, lora_B, module_scale / scaling, rank)  # B' = B * s_l / s
        exported[WEIGHT_PREFIX + name + LORA_A_SUFFIX] = padded_A
        exported[WEIGHT_PREFIX + name + LORA_B_SUFFIX] = padded_B
        modules[name] = {"rank": int(lora_A.shape[0]), "scaling": module_scale}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(exported, str(out_dir / SAFETENSORS_WEIGHTS_NAME), metadata=metadata or {"format": "pt"})
    (out_dir / CONFIG_NAME).write_text(json.dumps(exported_config(config, sorted(modules), rank, scaling), indent=2))
    record = {"source": str(adapter_dir.resolve()), "r": rank, "scaling": scaling, "modules": modules}
    (out_dir / VLLM_EXPORT_FILE).write_text(json.dumps(record, indent=2) + "\n")  # written last: the export is whole
    logger.info("Exported %d modules of %s to %s with r = max_lora_rank = %d", len(modules), adapter_dir, out_dir, rank)
    return out_dir


def _config_problems(config: dict, max_lora_rank: int) -> list[str]:
    """What vLLM's PEFTHelper would refuse in the configuration, or silently read otherwise than PEFT."""
    problems = []
    if max_lora_rank not in VLLM_MAX_LORA_RANKS:  # LoRAConfig.max_lora_rank: MaxLoRARanks
        problems.append(f"max_lora_rank {max_lora_rank} is not one of {list(VLLM_MAX_LORA_RANKS)}")
    rank = config.get("r", 0)
    if not isinstance(rank, int) or rank <= 0:  # PEFTHelper.__post_init__
        problems.append(f"r must be a positive integer, got {rank!r}")
    elif rank > max_lora_rank:  # PEFTHelper.validate_legal
        problems.append(f"LoRA rank {rank} is greater than max_lora_rank {max_lora_rank}")
    if config.get("use_dora"):  # PEFTHelper._validate_features
        problems.append("vLLM does not support DoRA (use_dora)")
    if config.get("modules_to_save"):
        problems.append(f"vLLM does not support modules_to_save ({config['modules_to_save']})")
    if config.get("bias", "none") != "none":
        problems.append(f"adapter bias {config['bias']!r} is not supported")
    # PEFTHelper keeps r and lora_alpha only: every module would be scaled lora_alpha / r.
    for pattern in ("rank_pattern", "alpha_pattern"):
        if config.get(pattern):
            problems.append(f"{pattern} is ignored by vLLM (export the adapter with python -m tlora.export)")
    return problems


def _weight_problems(
    tensors: dict[str, torch.Tensor], max_lora_rank: int, supported_modules: Optional[Iterable[str]]
) -> list[str]:
    """What vLLM's LoRAModel.from_local_checkpoint would refuse in the weights."""
    problems = []
    supported = None if supported_modules is None else set(supported_modules)
    for key, tensor in tensors.items():
        # vllm/lora/utils.py parse_fine_tuned_lora_name: base_model.model.<module>.lora_A.weight / .lora_B.weight
        if not (key.startswith(WEIGHT_PREFIX) and key.endswith((LORA_A_SUFFIX, LORA_B_SUFFIX))):
            problems.append(f"{key} is not a LoRA weight vLLM reads")
            continue
        module = key[len(WEIGHT_PREFIX) : -len(LORA_A_SUFFIX)]
        # check_unexpected_modules: the last part of the module name must be a LoRA module of the served model.
        if supported is not None and module.split(".")[-1] not in supported:
            problems.append(f"{module} is not one of the model's LoRA modules {sorted(supported)}")
        rank = tensor.shape[0] if key.endswith(LORA_A_SUFFIX) else tensor.shape[-1]
        if rank > max_lora_rank:  # the layer's LoRA buffers hold max_lora_rank columns
            problems.append(f"{key} has rank {rank} > max_lora_rank {max_lora_rank}")
    return problems


def check_vllm_compatible(
    adapter_dir: str | Path, max_lora_rank: int, supported_modules: Optional[Iterable[str]] = None
) -> None:
    """Raise `VLLMCompatibilityError` when vLLM would refuse the adapter or serve it with other scales than PEFT.

    vLLM cannot be installed beside this project's CPU stack, so its rules are restated here from its source:
    `vllm/config/lora.py` (LoRAConfig.max_lora_rank), `vllm/lora/peft_helper.py` (PEFTHelper.__post_init__,
    _validate_features, validate_legal) and `vllm/lora/utils.py` / `lora_model.py` (parse_fine_tuned_lora_name,
    check_unexpected_modules). `supported_modules` (e.g. `LLAMA_LORA_MODULES`) checks module names; None skips that.
    """
    adapter_dir = Path(adapter_dir)
    try:
        config, tensors, _ = read_adapter(adapter_dir)
    except AdapterExportError as error:
        raise VLLMCompatibilityError(str(error)) from error
    problems = _config_problems(config, max_lora_rank) + _weight_problems(tensors, max_lora_rank, supported_modules)
    if problems:
        raise VLLMCompatibilityError(f"vLLM cannot serve {adapter_dir} as PEFT does: " + "; ".join(problems))


def main(argv: Optional[Sequence[str]] = None) -> None:
    """`python -m tlora.export ADAPTER OUT [--max_lora_rank N]`."""
    parser = argparse.ArgumentParser(prog="python -m tlora.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("adapter", help="Folder of a saved PEFT LoRA adapter (adapter_config.json + safetensors).")
    parser.add_argument("out", help="Folder to write the plain LoRA adapter to.")
    parser.add_argument(
        "--max_lora_rank", type=int, default=None, choices=VLLM_MAX_LORA_RANKS,
        help="The r to pad every module to, as vLLM's --max-lora-rank (default: the smallest that fits).",
    )
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        out = export_for_vllm(arguments.adapter, arguments.out, arguments.max_lora_rank)
    except AdapterExportError as error:
        parser.exit(2, f"error: {error}\n")
    rank = json.loads((out / CONFIG_NAME).read_text())["r"]
    logger.info("Serve it with vLLM: enable_lora=True, max_lora_rank=%d, LoRARequest(..., lora_path=%r)", rank, str(out))
