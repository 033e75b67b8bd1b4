"""`TLoRAModel`, PEFT's LoRA tuner carrying TLoRA adapters, and the checks of a saved TLoRA adapter folder (its plan,
ranks, manifest and the fingerprint of the base weights it was trained on).

TLoRA is LoRA with a task-aware start: the plan is expressed as a standard `LoraConfig` (explicit target modules,
`rank_pattern`, `alpha_pattern`), PEFT builds its own LoRA layers from it, and TLoRA then writes A, zeroes B and
declares A frozen through PEFT's per-layer `frozen_peft_weight_names`, which `set_adapter`, `set_requires_grad`,
`enable_adapter_layers` and `_mark_only_adapters_as_trainable` all honour. Nothing of PEFT is copied or replaced, so
saving, loading, merging and DeepSpeed behave as for any LoRA adapter. The steps that build or load such a model are
in pipeline.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Optional

import torch
from peft.tuners.lora import LoraLayer, LoraModel
from peft.utils.other import get_pattern_key
from safetensors import safe_open

from .allocation import TLoRAPlan
from .constants import ADAPTER_MANIFEST_FILE, PLAN_FILE, TLORA_INIT_FILE
from .outputs import AdapterFolderError, check_manifest
from .targets import weight_fingerprint

logger = logging.getLogger(__name__)

PLAN_FILE_NAME = PLAN_FILE  # public name kept: `from tlora import PLAN_FILE_NAME`


def _register_frozen_lora_A(layer: LoraLayer, adapter_name: str) -> None:
    """Declare `lora_A` of `adapter_name` frozen on this layer (PEFT re-applies this after every grad toggle)."""
    frozen = dict(getattr(layer, "frozen_peft_weight_names", None) or {})
    names = tuple(frozen.get(adapter_name, ()))
    if "lora_A" not in names:
        names = names + ("lora_A",)
    frozen[adapter_name] = names
    layer.frozen_peft_weight_names = frozen
    layer.lora_A[adapter_name].weight.requires_grad_(False)


class TLoRAModel(LoraModel):
    """PEFT's LoRA tuner carrying TLoRA adapters: layers built by PEFT from a plan, A from the SVD of W C, B = 0.

    It adds no state to the layers beyond what `LoraModel` has, so a `PeftModel` whose tuner is a `TLoRAModel`
    saves an ordinary LoRA adapter (`peft_type` LORA) that stock PEFT loads.
    """

    @classmethod
    def adopt(cls, tuner: LoraModel) -> "TLoRAModel":
        """Turn the `LoraModel` inside a `PeftModel` into a `TLoRAModel` in place (same object, same layers)."""
        if isinstance(tuner, cls):
            return tuner
        if type(tuner) is not LoraModel:
            raise TypeError(f"expected a peft LoraModel, got {type(tuner).__name__}")
        tuner.__class__ = cls
        tuner.tlora_plans = {}
        return tuner

    def tlora_plan(self, adapter_name: str = "default") -> TLoRAPlan:
        """The TLoRA plan of an adapter."""
        return self.tlora_plans[adapter_name]

    def lora_layers(self, adapter_name: str) -> dict[str, LoraLayer]:
        """Module name (relative to the base model) -> LoRA layer holding `adapter_name`."""
        layers = {}
        for name, module in self.model.named_modules():
            if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
                layers[name] = module
        return layers

    @torch.no_grad()
    def initialize_tlora_adapter(
        self,
        adapter_name: str,
        plan: TLoRAPlan,
        lora_A: Mapping[str, torch.Tensor],
        freeze_lora_A: Optional[bool] = None,
    ) -> None:
        """Write A from `lora_A`, set B = 0 and (by default, as the plan says) freeze A."""
        freeze = plan.freeze_lora_A if freeze_lora_A is None else freeze_lora_A
        layers = self.lora_layers(adapter_name)
        expected = set(plan.target_modules())
        if set(layers) != expected:
            raise ValueError(
                f"adapter {adapter_name!r} has LoRA layers {sorted(set(layers) - expected)[:3]} not in the plan "
                f"and lacks {sorted(expected - set(layers))[:3]}"
            )
        for name, layer in layers.items():
            entry = plan.module(name)
            a_layer, b_layer = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
            source = lora_A[name]
            if tuple(a_layer.weight.shape) != tuple(source.shape) or source.shape[0] != entry.rank:
                raise ValueError(
                    f"A for {name} has shape {tuple(source.shape)}, the layer expects {tuple(a_layer.weight.shape)}"
                )
            a_layer.weight.copy_(source.to(device=a_layer.weight.device, dtype=a_layer.weight.dtype))
            b_layer.weight.zero_()
            if getattr(b_layer, "bias", None) is not None:
                b_layer.bias.zero_()
            if freeze:
                _register_frozen_lora_A(layer, adapter_name)
        self.tlora_plans[adapter_name] = plan

    def freeze_lora_A(self, adapter_name: str = "default") -> None:
        """Declare A of `adapter_name` frozen on every layer (used after loading a saved adapter)."""
        for layer in self.lora_layers(adapter_name).values():
            _register_frozen_lora_A(layer, adapter_name)


def modules_fingerprint(model: torch.nn.Module, names: Sequence[str]) -> str:
    """A digest of the weights of the named modules of `model`, in the model's module order (names and weights)."""
    wanted = set(names)
    digest = hashlib.sha256()
    for name, module in model.named_modules():
        if name in wanted:
            digest.update(name.encode())
            digest.update(weight_fingerprint(module.weight).encode())
    return digest.hexdigest()


def _require_plan(adapter_path: Path) -> TLoRAPlan:
    """The plan beside an adapter, or an error that says how to load the folder as plain LoRA."""
    plan_path = adapter_path / PLAN_FILE_NAME
    if not plan_path.is_file():
        raise AdapterFolderError(
            f"{adapter_path} has no {PLAN_FILE_NAME}, so it is not a TLoRA adapter folder (or its plan was lost): "
            "without the plan A cannot be kept frozen. Load it as plain LoRA with "
            f"peft.PeftModel.from_pretrained(model, {str(adapter_path)!r}), or copy the training run's "
            f"{PLAN_FILE_NAME} beside the adapter"
        )
    return TLoRAPlan.load(plan_path)


def _check_ranks(adapter_path: Path, plan: TLoRAPlan) -> None:
    """Raise when adapter_config.json gives a module another rank than the plan (or adapts other modules)."""
    config_path = adapter_path / "adapter_config.json"
    if not config_path.is_file():
        raise AdapterFolderError(f"{adapter_path} has {PLAN_FILE_NAME} but no adapter_config.json: the adapter was not saved")
    config = json.loads(config_path.read_text())
    pattern = config.get("rank_pattern") or {}
    for name in plan.target_modules():
        key = get_pattern_key(pattern.keys(), name) if pattern else name
        rank = pattern.get(key, config.get("r"))
        if rank != plan.module(name).rank:
            raise AdapterFolderError(
                f"{config_path} gives {name} rank {rank}, but {PLAN_FILE_NAME} (and the saved A) has rank "
                f"{plan.module(name).rank}; the configuration was edited, or the folder mixes files of two runs: restore "
                "the adapter_config.json saved with these weights (or rerun the training)"
            )


def _recorded_fingerprint(adapter_path: Path, manifest: Optional[dict]) -> tuple[Optional[str], str, bool]:
    """(fingerprint of the base weights recorded at training time, where, whether that base was quantized)."""
    if manifest is not None and manifest.get("base_fingerprint"):
        return manifest["base_fingerprint"], ADAPTER_MANIFEST_FILE, bool(manifest.get("base_quantized"))
    init_path = adapter_path / TLORA_INIT_FILE
    if init_path.is_file():
        with safe_open(str(init_path), framework="pt", device="cpu") as handle:
            recorded = (handle.metadata() or {}).get("base_fingerprint")
        return recorded, TLORA_INIT_FILE, False
    return None, "", False


def _check_base_weights(model: torch.nn.Module, adapter_path: Path, plan: TLoRAPlan, manifest: Optional[dict]) -> None:
    """Raise when the target weights of `model` differ from those the adapter was trained on (when recorded)."""
    recorded, source, quantized = _recorded_fingerprint(adapter_path, manifest)
    if recorded is None:
        logger.info("%s records no fingerprint of its base weights; they are not checked.", adapter_path)
        return
    if quantized or getattr(model, "is_quantized", False):
        logger.warning("The adapter or the base is quantized; the base weights' fingerprint is not compared.")
        return
    actual = modules_fingerprint(model, [module.name for module in plan.modules])
    if actual != recorded:
        raise AdapterFolderError(
            f"the base model's target weights differ from those the adapter in {adapter_path} was trained on "
            f"(fingerprint {actual[:16]} here, {recorded[:16]} in {source}): load the base model of the training run "
            "(run_record.json names it), or pass check_base_weights=False if the difference is intended"
        )


def _check_manifest_method(adapter_path: Path, manifest: Optional[dict]) -> None:
    """Raise when the folder's last complete save was not a TLoRA adapter (its plan is left from another run)."""
    if manifest is not None and manifest.get("method") not in (None, "tlora"):
        raise AdapterFolderError(
            f"{adapter_path} holds a {manifest['method']} adapter ({ADAPTER_MANIFEST_FILE}); its {PLAN_FILE_NAME} is "
            "left from an earlier run. Load it with peft.PeftModel.from_pretrained instead"
        )
    if manifest is not None and PLAN_FILE_NAME not in manifest.get("files", {}):
        raise AdapterFolderError(
            f"{adapter_path}: {PLAN_FILE_NAME} is not part of the save recorded in {ADAPTER_MANIFEST_FILE}; it is "
            "left from another run"
        )


def checked_adapter_plan(model: torch.nn.Module, folder: Path, check_base_weights: bool = True) -> TLoRAPlan:
    """The plan of the saved adapter `folder`, after checking the folder against it: ranks, manifest, and (with
    `check_base_weights`) the fingerprint of `model`'s target weights; `AdapterFolderError` says what is wrong."""
    plan = _require_plan(folder)
    _check_ranks(folder, plan)  # before the manifest: an edited rank is named with its module
    manifest = check_manifest(folder)
    _check_manifest_method(folder, manifest)
    if check_base_weights:
        _check_base_weights(model, folder, plan, manifest)
    return plan


__all__ = ["PLAN_FILE_NAME", "TLoRAModel", "checked_adapter_plan", "modules_fingerprint"]
