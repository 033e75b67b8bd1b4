"""Which target modules read the same tensor (one short no-grad forward before the pass), and so the layout of
every module's statistic: a covariance C shared by the readers of one tensor, or W C for a lone reader with m < n."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import CalibrationError
from ..targets import TargetModule

Layout = dict[str, tuple[str, str]]  # module name -> ("covariance", shared key) or ("cross", module name)


def _probe_inputs(inputs: dict) -> dict:
    """The first sample's first 16 positions of `inputs`, without labels."""
    probe = {}
    for key, value in inputs.items():
        if torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == inputs["input_ids"].shape[0]:
            value = value[:1]
            if value.dim() >= 2 and value.shape[1] == inputs["input_ids"].shape[1]:
                value = value[:, :16]
        probe[key] = value
    probe.pop("labels", None)
    return probe


def _record_target_inputs(
    model: nn.Module, targets: list[TargetModule], probe: dict
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """One no-grad forward: each target's first input tensor (in call order) and how often it was called."""
    seen: dict[str, Any] = {}
    calls: dict[str, int] = {}

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            seen.setdefault(name, args[0])
            calls[name] = calls.get(name, 0) + 1

        return hook

    handles = [target.module.register_forward_pre_hook(make_hook(target.name)) for target in targets]
    try:
        with torch.no_grad():
            model(**probe)
    finally:
        for handle in handles:
            handle.remove()
    return seen, calls


def _check_probe(targets: list[TargetModule], seen: dict[str, torch.Tensor], calls: dict[str, int]) -> None:
    """Raise `CalibrationError` for targets never called, fed one vector per sample, or called repeatedly."""
    never = [t.name for t in targets if t.name not in seen]
    if never:
        raise CalibrationError(
            f"target modules never called in a forward pass: {never[:6]}; remove them from target_modules"
        )
    flat = [n for n, tensor in seen.items() if tensor.dim() != 3]
    if flat:
        raise CalibrationError(
            f"target modules {flat[:4]} see one vector per sample (input shape "
            f"{tuple(seen[flat[0]].shape)}), but TLoRA's covariance is taken over the positions of each sample; "
            f"exclude them, e.g. exclude_modules={[n.split('.', 1)[-1] if '.' in n else n for n in flat[:2]]}"
        )
    repeated = [n for n, c in calls.items() if c > 1]
    if repeated:
        raise CalibrationError(
            f"target modules called more than once per forward pass (shared weights): {repeated[:6]}; "
            "TLoRA supports modules applied once per forward"
        )


def _choose_layout(targets: list[TargetModule], seen: dict[str, torch.Tensor]) -> Layout:
    """Readers of one tensor share one covariance; a lone reader with m < n stores W C ("cross") instead."""
    layout: Layout = {}
    leader_of_tensor: dict[int, str] = {}
    readers: dict[str, list[str]] = {}
    order = sorted(targets, key=lambda t: list(seen).index(t.name))
    for target in order:
        tensor_id = id(seen[target.name])
        leader = leader_of_tensor.setdefault(tensor_id, target.name)
        readers.setdefault(leader, []).append(target.name)
    for leader, names in readers.items():
        for name in names:
            target = next(t for t in targets if t.name == name)
            if len(names) == 1 and target.out_features < target.in_features:
                layout[name] = ("cross", name)
            else:
                layout[name] = ("covariance", leader)
    return layout


def probe_layout(model: nn.Module, targets: list[TargetModule], inputs: dict) -> Layout:
    """Find which targets read the same tensor (one short no-grad forward) and choose each module's layout."""
    seen, calls = _record_target_inputs(model, targets, _probe_inputs(inputs))
    _check_probe(targets, seen, calls)
    return _choose_layout(targets, seen)


def statistic_groups(targets: list[TargetModule], layout: Layout, count: int) -> list[frozenset]:
    """The statistic keys split into `count` runs, in the order the forward pass reaches them, of about equal size:
    what each pass of `statistics_passes` collects (layers are cut where the running size crosses k/count)."""
    by_name = {target.name: target for target in targets}
    sizes: dict[str, int] = {}
    for name, (kind, key) in layout.items():  # the layout lists modules in call order
        if key not in sizes:
            rows, columns = by_name[name if kind == "cross" else key].statistic_shape(kind)
            sizes[key] = rows * columns
    total = sum(sizes.values())
    groups: list[set] = [set() for _ in range(count)]
    running = 0
    for key, size in sizes.items():
        # Each key goes to the group its midpoint falls in.
        index = min(count - 1, int((running + size / 2) * count // max(total, 1)))
        groups[index].add(key)
        running += size
    return [frozenset(group) for group in groups]  # a group may be empty when count exceeds the keys
