"""The method registry: every fine-tuning method the paper compares, one entry each.

Everything that lists methods is derived from `METHOD_TABLE`: the training scripts' `--method` choices
(`tlora.training.arguments`), the builders (`tlora.training.registry`, which imports each entry's `builder`), the
report's method labels (`tlora.evaluation.report`) and the benchmarks' selections (`bench/common.py`). Adding a
method means adding its entry here and writing its builder.

This module imports nothing (the training core and evaluation both read it; evaluation must not import training).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MethodEntry:
    """One fine-tuning method: its command-line name, how the paper prints it, and where its builder lives."""

    name: str  # the --method value
    label: str  # the paper's spelling, used by the report
    builder: str  # "module:function" of its builder, MethodContext -> BuiltMethod
    calibrated: bool = False  # needs the calibration set
    modifies_base: bool = False  # changes the base weights (the final save converts the adapter)
    benchmarked: bool = False  # one of the methods the CPU benchmarks (bench/) compare
    aliases: tuple[str, ...] = ()  # other spellings the report recognises


_METHODS = "tlora.training.methods:"
_BASELINES = "tlora.training.baselines:"

METHOD_TABLE: tuple[MethodEntry, ...] = (
    MethodEntry("full", "FULL", _METHODS + "build_full", aliases=("fullfinetuning", "fft")),
    MethodEntry("lora", "LoRA", _METHODS + "build_lora", benchmarked=True),
    MethodEntry("adalora", "AdaLoRA", "tlora.training.adalora:build_adalora"),
    MethodEntry("loraplus", "LoRA+", _METHODS + "build_loraplus", aliases=("lora+",)),
    MethodEntry("dora", "DoRA", _METHODS + "build_dora", benchmarked=True),
    MethodEntry("olora", "OLoRA", _METHODS + "build_olora", modifies_base=True),
    MethodEntry("pissa", "PiSSA", _METHODS + "build_pissa", modifies_base=True, benchmarked=True),
    MethodEntry("loraga", "LoRA-GA", _BASELINES + "build_loraga", calibrated=True, modifies_base=True, benchmarked=True),
    MethodEntry("corda", "CorDA", _BASELINES + "build_corda", calibrated=True, modifies_base=True, benchmarked=True),
    MethodEntry("eva", "EVA", _BASELINES + "build_eva", calibrated=True, benchmarked=True),
    MethodEntry("tlora", "TLoRA", _METHODS + "build_tlora", calibrated=True, benchmarked=True),
)

METHOD_NAMES: tuple[str, ...] = tuple(entry.name for entry in METHOD_TABLE)
CALIBRATED_METHODS: tuple[str, ...] = tuple(entry.name for entry in METHOD_TABLE if entry.calibrated)
BASE_MODIFYING_METHODS: tuple[str, ...] = tuple(entry.name for entry in METHOD_TABLE if entry.modifies_base)


def method_entry(name: str) -> MethodEntry:
    """The registry entry of `name`; an unknown name raises ValueError listing the methods."""
    for entry in METHOD_TABLE:
        if entry.name == name:
            return entry
    raise ValueError(f"unknown method {name!r}; choose from {sorted(METHOD_NAMES)}")


def normalized_method_key(method: str) -> str:
    """A method spelling reduced to lower case without '-', '_' or ' ' (`LoRA-GA` -> `loraga`)."""
    return method.lower().replace("-", "").replace("_", "").replace(" ", "")


def method_display_names() -> dict[str, str]:
    """The paper's spelling of each method, keyed by the normalized spelling of its name and of its aliases."""
    names: dict[str, str] = {}
    for entry in METHOD_TABLE:
        for spelling in (entry.name, *entry.aliases):
            names[normalized_method_key(spelling)] = entry.label
    return names
