"""Output-folder safety: which files make a folder a run's, atomic writes, and the manifest of a saved adapter.

A training run writes its final files into a staging folder inside the output folder and then moves them into place
one by one with `os.replace`; the manifest (`tlora_adapter.json`: a SHA-256 of every saved file, the plan's digest
and the base weights' fingerprint) is moved last. A run killed while moving leaves files that disagree with the
manifest beside them, which `check_manifest` (used by `tlora.load_tlora_model` and evaluation) refuses.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

from .constants import (
    ADAPTER_MANIFEST_FILE,
    INITIAL_ADAPTER_DIR,
    MERGED_DIR,
    PLAN_FILE,
    PLAN_HEATMAP_FILE,
    RUN_RECORD_FILE,
    TLORA_INIT_FILE,
)

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = 1
STAGING_DIR = ".tlora-saving"  # the final save is written here, then moved into the output folder
MERGED_STAGING_DIR = f".{MERGED_DIR}.partial"  # --merge writes here, then renames it to merged/
RUN_ARTIFACT_FILES = (
    RUN_RECORD_FILE,
    ADAPTER_MANIFEST_FILE,
    PLAN_FILE,
    PLAN_HEATMAP_FILE,
    TLORA_INIT_FILE,
    "adapter_config.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
)
RUN_ARTIFACT_DIRS = (INITIAL_ADAPTER_DIR, MERGED_DIR, STAGING_DIR, MERGED_STAGING_DIR)
CHECKPOINT_DIR = re.compile(r"^checkpoint-\d+$")


class OutputFolderError(FileExistsError):
    """The output folder already holds another run's files."""


class AdapterFolderError(ValueError):
    """An adapter folder that cannot be loaded as it is: no plan, mixed files of two runs, other base weights."""


def run_artifacts(directory: str | Path) -> list[str]:
    """Names of the files and folders in `directory` that a training run writes (empty when there are none)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for entry in sorted(directory.iterdir()):
        if entry.is_dir() and (entry.name in RUN_ARTIFACT_DIRS or CHECKPOINT_DIR.match(entry.name)):
            found.append(entry.name + "/")
        elif entry.is_file() and entry.name in RUN_ARTIFACT_FILES:
            found.append(entry.name)
    return found


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` through a temporary file in the same folder and `os.replace`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(text)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def atomic_save_safetensors(tensors: Mapping[str, Any], path: str | Path, metadata: Optional[dict] = None) -> Path:
    """`safetensors.torch.save_file` through a temporary file in the same folder and `os.replace`."""
    from safetensors.torch import save_file

    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(dict(tensors), str(temporary), metadata=metadata)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_manifest(files: Mapping[str, str | Path], **fields: Any) -> dict[str, Any]:
    """The manifest of a save: the SHA-256 of each file ({name in the output folder: where it is now}) plus `fields`."""
    digests = {name: file_digest(path) for name, path in sorted(files.items())}
    return {"format": MANIFEST_FORMAT, "files": digests, **fields}


def publish_staged(staging: str | Path, directory: str | Path, manifest: dict[str, Any]) -> None:
    """Move every file of `staging` into `directory` (os.replace, one by one), then the manifest, then drop staging."""
    staging, directory = Path(staging), Path(directory)
    for entry in sorted(staging.iterdir()):
        target = directory / entry.name
        if entry.is_dir():
            if target.exists():
                shutil.rmtree(target)
            entry.rename(target)
        else:
            os.replace(entry, target)
    atomic_write_text(directory / ADAPTER_MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
    staging.rmdir()


def read_manifest(directory: str | Path) -> Optional[dict[str, Any]]:
    """The manifest of an adapter folder, or None when it has none."""
    path = Path(directory) / ADAPTER_MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise AdapterFolderError(f"{path} is not valid JSON ({error}); the save that wrote it did not finish") from error


def check_manifest(directory: str | Path) -> Optional[dict[str, Any]]:
    """Raise `AdapterFolderError` when a file listed in the folder's manifest is missing or differs; the manifest."""
    manifest = read_manifest(directory)
    if manifest is None:
        return None
    directory = Path(directory)
    missing = [name for name in manifest.get("files", {}) if not (directory / name).is_file()]
    changed = [
        name for name, digest in manifest.get("files", {}).items()
        if name not in missing and file_digest(directory / name) != digest
    ]
    if missing or changed:
        raise AdapterFolderError(
            f"{directory} mixes files of different saves: {', '.join(changed) or 'nothing'} differ(s) from "
            f"{ADAPTER_MANIFEST_FILE}, the record of the last complete save, and {', '.join(missing) or 'nothing'} "
            "is missing. A run was probably killed while saving or writing the folder, or a file was replaced by "
            "hand: rerun the training (--resume_from_checkpoint true continues it) or restore the folder"
        )
    return manifest
