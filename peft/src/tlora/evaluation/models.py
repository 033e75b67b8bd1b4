"""Resolve `--model PATH` (merged model directory, adapter directory or hub id) and load it for evaluation.

An adapter directory (one with `adapter_config.json`) is loaded on its base model, read from
`base_model_name_or_path` in that file, and merged on the fly (`PeftModel.from_pretrained` + `merge_and_unload`),
so every backend sees a plain model. Remote code never runs unless the caller opts in with the `trust_remote_code` flag (off by default).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Optional

from ..constants import MERGED_DIR, VLLM_EXPORT_FILE
from ..export import check_plain_lora, check_vllm_compatible, export_for_vllm, vllm_max_lora_rank
from ..outputs import AdapterFolderError, check_manifest

logger = logging.getLogger(__name__)

ADAPTER_CONFIG_NAME = "adapter_config.json"
MODEL_CONFIG_NAME = "config.json"
TOKENIZER_FILE_NAMES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model")
MERGED_MARKER_NAME = "tlora_merged_from.json"
ADAPTER_WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")

DTYPES = ("auto", "float32", "float16", "bfloat16")


class ModelResolutionError(ValueError):
    """`--model` names nothing that can be loaded (missing directory, adapter without a usable base model)."""


@dataclass
class ResolvedModel:
    """What `--model PATH` refers to: a merged model, an adapter on a base model, or a hub id."""

    kind: str  # "merged" | "adapter" | "hub"
    path: str
    base_model: Optional[str] = None
    adapter_path: Optional[str] = None


HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9_.-]+)?$")


def _looks_like_local_path(path: str) -> bool:
    """Whether `path` is written as a filesystem path rather than a hub id (`org/name` or `name`)."""
    return path.startswith((".", "~")) or HUB_ID_PATTERN.match(path) is None


def _read_adapter_config(adapter_dir: str) -> dict:
    """The JSON of `adapter_dir/adapter_config.json`."""
    config_path = os.path.join(adapter_dir, ADAPTER_CONFIG_NAME)
    try:
        with open(config_path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise ModelResolutionError(f"{config_path} is not valid JSON ({error}); re-save the adapter.") from error


def _check_adapter_files(adapter_dir: str) -> None:
    """Raise unless the adapter folder holds its weights and agrees with the manifest of its last complete save."""
    if not any(os.path.isfile(os.path.join(adapter_dir, name)) for name in ADAPTER_WEIGHT_NAMES):
        raise ModelResolutionError(
            f"{adapter_dir} holds {ADAPTER_CONFIG_NAME} but no adapter weights ({' or '.join(ADAPTER_WEIGHT_NAMES)}); "
            "the run that wrote it did not finish saving, or the file was moved: point --model at a complete "
            "adapter folder (or rerun the training)."
        )
    try:
        check_manifest(adapter_dir)
    except AdapterFolderError as error:
        raise ModelResolutionError(str(error)) from error


def _hub_adapter_config(repo_id: str) -> Optional[dict]:
    """The adapter configuration of a hub repository, or None when it has none or the hub cannot be reached."""
    try:
        from huggingface_hub import hf_hub_download

        config_path = hf_hub_download(repo_id, ADAPTER_CONFIG_NAME)
    except Exception:  # not an adapter repository, offline, or no such repository: treat as a plain model id
        return None
    with open(config_path, encoding="utf-8") as handle:
        return json.load(handle)


def _base_model_from_config(adapter_config: dict, adapter_path: str, base_model: Optional[str]) -> str:
    """The base model of an adapter: the override if given, else `base_model_name_or_path` from its config."""
    if base_model:
        expanded = os.path.expanduser(base_model)
        if not os.path.isdir(expanded) and (os.path.exists(expanded) or _looks_like_local_path(base_model)):
            raise ModelResolutionError(
                f"--base_model {base_model} is not a model folder on this machine (it does not exist or is a file) and "
                "not a Hugging Face hub id ('org/name'); pass the base model's local folder or hub id."
            )
        return expanded if os.path.isdir(expanded) else base_model
    name = adapter_config.get("base_model_name_or_path")
    if not name:
        raise ModelResolutionError(
            f"The adapter at {adapter_path} does not name its base model (no base_model_name_or_path in "
            f"{ADAPTER_CONFIG_NAME}); pass the base model explicitly with --base_model."
        )
    if _looks_like_local_path(name) and not os.path.isdir(os.path.expanduser(name)):
        raise ModelResolutionError(
            f"The adapter at {adapter_path} was trained on {name!r}, which is not a directory on this machine; "
            "pass the base model's local directory or hub id with --base_model."
        )
    return os.path.expanduser(name) if _looks_like_local_path(name) else name


def resolve_model(path: str, base_model: Optional[str] = None) -> ResolvedModel:
    """Decide whether `path` is a merged model directory, an adapter directory or a hub id (`base_model` overrides
    the base model an adapter names)."""
    expanded = os.path.expanduser(path)
    if os.path.isdir(expanded):
        if os.path.isfile(os.path.join(expanded, ADAPTER_CONFIG_NAME)):
            _check_adapter_files(expanded)
            config = _read_adapter_config(expanded)
            base = _base_model_from_config(config, expanded, base_model)
            return ResolvedModel(kind="adapter", path=expanded, base_model=base, adapter_path=expanded)
        if os.path.isfile(os.path.join(expanded, MODEL_CONFIG_NAME)):
            return ResolvedModel(kind="merged", path=expanded)
        raise ModelResolutionError(
            f"{path} is a directory but holds neither {ADAPTER_CONFIG_NAME} (an adapter) nor {MODEL_CONFIG_NAME} "
            "(a model); point --model at the training output folder that holds the saved adapter or model."
        )
    if os.path.exists(expanded) or _looks_like_local_path(path):
        raise ModelResolutionError(
            f"{path} is not a model directory (it does not exist or is a file); pass a merged model directory, "
            "an adapter directory or a Hugging Face hub id such as meta-llama/Llama-2-7b-hf."
        )
    adapter_config = _hub_adapter_config(path)
    if adapter_config is not None:
        base = _base_model_from_config(adapter_config, path, base_model)
        return ResolvedModel(kind="adapter", path=path, base_model=base, adapter_path=path)
    return ResolvedModel(kind="hub", path=path)


def torch_dtype(dtype: str) -> Any:
    """The torch dtype (or "auto") named by `dtype`."""
    import torch

    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}.")
    return "auto" if dtype == "auto" else getattr(torch, dtype)


def default_device() -> str:
    """The first GPU when one is present, else the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _has_tokenizer(directory: str) -> bool:
    """Whether a local directory holds tokenizer files."""
    return os.path.isdir(directory) and any(
        os.path.isfile(os.path.join(directory, name)) for name in TOKENIZER_FILE_NAMES
    )


def load_tokenizer(resolved: ResolvedModel, *, trust_remote_code: bool = False):
    """The tokenizer of a resolved model: the adapter directory's own if it has one, else the base model's."""
    from transformers import AutoTokenizer

    if resolved.kind == "adapter" and _has_tokenizer(resolved.path):
        source = resolved.path
    else:
        source = resolved.base_model if resolved.kind == "adapter" else resolved.path
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_and_tokenizer(
    path: str,
    *,
    dtype: str = "auto",
    device: Optional[str] = None,
    trust_remote_code: bool = False,
    base_model: Optional[str] = None,
):
    """A plain causal LM and its tokenizer for `path`; adapters are merged into their base model on the fly."""
    from transformers import AutoModelForCausalLM

    resolved = resolve_model(path, base_model=base_model)
    tokenizer = load_tokenizer(resolved, trust_remote_code=trust_remote_code)
    source = resolved.base_model if resolved.kind == "adapter" else resolved.path
    logger.info("Loading %s model from %s", resolved.kind, source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code)
    if resolved.kind == "adapter":
        model = _merge_adapter(model, tokenizer, resolved.adapter_path)
    model.to(device or default_device())
    model.eval()
    return model, tokenizer


def _merge_adapter(model, tokenizer, adapter_path: str):
    """Load the PEFT adapter at `adapter_path` onto `model` and fold it into the weights."""
    from peft import PeftModel

    embedding_rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > embedding_rows:
        logger.info("Resizing the base model's embeddings from %d to %d tokens", embedding_rows, len(tokenizer))
        model.resize_token_embeddings(len(tokenizer))
    logger.info("Merging the adapter %s into its base model", adapter_path)
    peft_model = PeftModel.from_pretrained(model, adapter_path)
    return peft_model.merge_and_unload()


def _adapter_fingerprint(adapter_path: str) -> str:
    """A short digest of the adapter's configuration and weights (path, size, modification time) naming its merge."""
    digest = hashlib.sha256(os.path.abspath(adapter_path).encode())
    for name in (ADAPTER_CONFIG_NAME, *ADAPTER_WEIGHT_NAMES):
        path = os.path.join(adapter_path, name)
        if os.path.isfile(path):
            stat = os.stat(path)
            digest.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


TRAINING_MERGED_DIR = MERGED_DIR  # where training's --merge writes the merged model, inside the run directory


def _merged_copy_from_training(adapter_dir: str) -> Optional[str]:
    """`<adapter dir>/merged` when training wrote a merged model there after the adapter's weights, else None."""
    candidate = os.path.join(adapter_dir, TRAINING_MERGED_DIR)
    config = os.path.join(candidate, MODEL_CONFIG_NAME)
    if not os.path.isfile(config):
        return None
    weights = [os.path.join(adapter_dir, name) for name in ADAPTER_WEIGHT_NAMES]
    newest_adapter = max((os.path.getmtime(path) for path in weights if os.path.isfile(path)), default=0.0)
    return candidate if os.path.getmtime(config) >= newest_adapter else None


def merged_model_dir(
    path: str,
    work_dir: str,
    *,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    base_model: Optional[str] = None,
) -> str:
    """A directory (or hub id) holding a plain model for `path`: for an adapter, the `merged/` folder that training
    wrote beside it when it is up to date, else a merged copy written once into `work_dir` and reused."""
    resolved = resolve_model(path, base_model=base_model)
    if resolved.kind != "adapter":
        return resolved.path
    if not os.path.isdir(resolved.path):
        raise ModelResolutionError("Merging a hub adapter for vLLM is not supported; download it first.")
    trained_merge = _merged_copy_from_training(resolved.path)
    if trained_merge is not None:
        logger.info("Using the merged model that training wrote: %s", trained_merge)
        return trained_merge
    fingerprint = _adapter_fingerprint(resolved.path)
    target = os.path.join(work_dir, f"merged-{fingerprint}")
    marker = os.path.join(target, MERGED_MARKER_NAME)
    if os.path.isfile(marker):
        logger.info("Reusing the merged model in %s", target)
        return target
    model, tokenizer = load_model_and_tokenizer(
        path, dtype=dtype, device="cpu", trust_remote_code=trust_remote_code, base_model=base_model
    )
    os.makedirs(target, exist_ok=True)
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    with open(marker, "w", encoding="utf-8") as handle:
        json.dump({"adapter_path": os.path.abspath(resolved.path), "base_model": resolved.base_model}, handle)
    logger.info("Wrote the merged model to %s", target)
    return target


@dataclass
class ServedAdapter:
    """What vLLM loads to serve an adapter unmerged: base model, tokenizer, LoRA folder and `max_lora_rank`."""

    base_model: str
    tokenizer: str
    lora_path: str
    max_lora_rank: int


def _has_patterns(adapter_config: dict) -> bool:
    """Whether an adapter sets per-module ranks or alphas, which vLLM ignores."""
    return bool(adapter_config.get("rank_pattern") or adapter_config.get("alpha_pattern"))


def exported_adapter_dir(adapter_dir: str, work_dir: str, max_lora_rank: Optional[int] = None) -> str:
    """A plain LoRA copy of `adapter_dir` for vLLM (`tlora.export`), written once into `work_dir` and reused."""
    suffix = f"r{max_lora_rank}" if max_lora_rank is not None else "rauto"
    target = os.path.join(work_dir, f"lora-{_adapter_fingerprint(adapter_dir)}-{suffix}")
    if os.path.isfile(os.path.join(target, VLLM_EXPORT_FILE)):
        logger.info("Reusing the adapter exported for vLLM in %s", target)
        return target
    logger.info("Exporting %s for vLLM (per-module scales folded into B, ranks padded) to %s", adapter_dir, target)
    return str(export_for_vllm(adapter_dir, target, max_lora_rank))


def served_adapter(
    path: str, work_dir: str, *, base_model: Optional[str] = None, max_lora_rank: Optional[int] = None
) -> ServedAdapter:
    """How vLLM serves the adapter at `path` without merging: exported first when it has rank or alpha patterns."""
    resolved = resolve_model(path, base_model=base_model)
    if resolved.kind != "adapter":
        raise ModelResolutionError(
            f"--serve_adapter serves a LoRA adapter unmerged, but {path} is a {resolved.kind} model; point --model at "
            "the adapter folder or drop --serve_adapter."
        )
    if not os.path.isdir(resolved.path):
        raise ModelResolutionError("Serving a hub adapter with --serve_adapter is not supported; download it first.")
    config = _read_adapter_config(resolved.path)
    check_plain_lora(config, resolved.path)  # DoRA, base-modifying inits, ...: vLLM would serve something else
    lora_path = resolved.path
    if _has_patterns(config):
        lora_path = exported_adapter_dir(resolved.path, work_dir, max_lora_rank)
    rank = vllm_max_lora_rank(_read_adapter_config(lora_path)["r"], max_lora_rank)
    check_vllm_compatible(lora_path, rank)
    tokenizer = resolved.path if _has_tokenizer(resolved.path) else resolved.base_model
    return ServedAdapter(base_model=resolved.base_model, tokenizer=tokenizer, lora_path=lora_path, max_lora_rank=rank)


__all__ = [
    "ModelResolutionError",
    "ResolvedModel",
    "ServedAdapter",
    "default_device",
    "load_model_and_tokenizer",
    "load_tokenizer",
    "merged_model_dir",
    "resolve_model",
    "served_adapter",
    "torch_dtype",
]
