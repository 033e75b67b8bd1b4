"""The run record: what a training run did, enough to rerun it (run_record.json in the output folder)."""

from __future__ import annotations

import dataclasses
import json
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from ..constants import RUN_RECORD_FILE

LIBRARIES = ("torch", "transformers", "peft", "tlora", "accelerate", "datasets", "deepspeed", "safetensors", "tokenizers")


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries a run depends on (absent ones are left out)."""
    versions = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _jsonable(value: Any) -> Any:
    """Arguments as JSON data (enums and paths become strings)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def arguments_record(model_args, data_args, method_args, training_args) -> dict[str, Any]:
    """The resolved arguments of a run, grouped as on the command line."""
    return {
        "model": _jsonable(model_args),
        "data": _jsonable(data_args),
        "method": _jsonable(method_args),
        "training": _jsonable(training_args.to_dict()),
    }


def write_run_record(output_dir: str | Path, record: dict[str, Any]) -> Path:
    """Write (or overwrite) run_record.json atomically."""
    path = Path(output_dir) / RUN_RECORD_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(_jsonable(record), indent=2) + "\n")
    temporary.replace(path)
    return path


def read_run_record(output_dir: str | Path) -> dict[str, Any]:
    """The run record of an output folder."""
    return json.loads((Path(output_dir) / RUN_RECORD_FILE).read_text())
