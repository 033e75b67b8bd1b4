"""The builders of the method registry (`tlora.methods_table`): each entry's `builder` imported, and `build_method`."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from ..methods_table import BASE_MODIFYING_METHODS, CALIBRATED_METHODS, METHOD_TABLE, method_entry
from .methods import BuiltMethod, MethodContext

Builder = Callable[[MethodContext], BuiltMethod]

__all__ = ["BASE_MODIFYING_METHODS", "CALIBRATED_METHODS", "METHOD_BUILDERS", "build_method", "resolve_builder"]


def resolve_builder(reference: str) -> Builder:
    """The function a registry entry names as "module:function"."""
    module_name, _, function_name = reference.partition(":")
    return getattr(importlib.import_module(module_name), function_name)


METHOD_BUILDERS: dict[str, Builder] = {entry.name: resolve_builder(entry.builder) for entry in METHOD_TABLE}


def build_method(context: MethodContext) -> BuiltMethod:
    """Look the method up in the registry and build it."""
    method_entry(context.arguments.method)  # an unknown name raises, listing the methods
    return METHOD_BUILDERS[context.arguments.method](context)
