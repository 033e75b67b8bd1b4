"""Reports of a TLoRA plan: a compact text table, the JSON file and a heatmap of ranks across layers."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from .allocation import TLoRAPlan
from .constants import PLAN_FILE as PLAN_JSON
from .constants import PLAN_HEATMAP_FILE as PLAN_HEATMAP


def _grid(plan: TLoRAPlan):
    """(layers, module types, {(layer, type): entry}) in model order."""
    layers, types, cells = [], [], {}
    for entry in plan.modules:
        layer = entry.layer if entry.layer is not None else -1
        if layer not in layers:
            layers.append(layer)
        if entry.module_type not in types:
            types.append(entry.module_type)
        cells[(layer, entry.module_type)] = entry
    return layers, types, cells


def _short(module_type: str) -> str:
    return module_type.split(".")[-1] if module_type.count(".") <= 1 else ".".join(module_type.split(".")[-2:])


def format_plan_table(plan: TLoRAPlan) -> str:
    """Layer x module type: 'rank/scale' per cell, then totals against plain LoRA at the same r."""
    layers, types, cells = _grid(plan)
    headers = ["layer"] + [_short(t) for t in types]
    rows = []
    for layer in layers:
        row = [str(layer) if layer >= 0 else "-"]
        for module_type in types:
            entry = cells.get((layer, module_type))
            row.append("" if entry is None else f"{entry.rank}/{entry.scaling:.3g}")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows + [headers]) for i in range(len(headers))]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    lora = plan.lora_trainable_parameters
    trainable = plan.trainable_parameters
    lines.append("")
    lines.append("cells: rank/scale (scale = alpha_l / r, the update's effective multiplier)")
    lines.append(
        f"modules: {len(plan.modules)} targets, {len(plan.target_modules())} adapted, "
        f"{len(plan.dropped_modules)} at rank 0 (no adapter)"
    )
    lines.append(
        f"budget: {plan.budget_type} {plan.budget:,} (spent {plan.budget_spent:,}); nominal r={plan.r}, "
        f"alpha={plan.lora_alpha:g}; total rank {plan.total_rank:,}"
    )
    lines.append(
        f"trainable parameters: TLoRA {trainable:,} ({'B only' if plan.freeze_lora_A else 'A and B'}) vs LoRA "
        f"r={plan.r} {lora:,} ({100 * trainable / lora:.1f}%)"
    )
    return "\n".join(lines)


def save_plan_heatmap(plan: TLoRAPlan, path: str | Path, title: Optional[str] = None) -> Path:
    """Draw ranks (colour) and scales (annotation) across layers x module types as a PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    layers, types, cells = _grid(plan)
    ranks = np.full((len(types), len(layers)), np.nan)
    for (layer, module_type), entry in cells.items():
        ranks[types.index(module_type), layers.index(layer)] = entry.rank
    width = min(24, 2.5 + 0.35 * len(layers))
    height = 1.6 + 0.45 * len(types)
    figure, axis = plt.subplots(figsize=(width, height))
    image = axis.imshow(ranks, aspect="auto", cmap="viridis", interpolation="nearest")
    axis.set_xticks(range(len(layers)), [str(l) if l >= 0 else "-" for l in layers], fontsize=7)
    axis.set_yticks(range(len(types)), [_short(t) for t in types], fontsize=8)
    axis.set_xlabel("layer")
    figure.colorbar(image, ax=axis, label="rank r_l")
    if len(layers) * len(types) <= 400:
        for (layer, module_type), entry in cells.items():
            axis.text(layers.index(layer), types.index(module_type), str(entry.rank), ha="center", va="center",
                      fontsize=6, color="white")
    axis.set_title(title or f"TLoRA ranks (nominal r={plan.r}, total {plan.total_rank})")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def write_plan_reports(plan: TLoRAPlan, output_dir: str | Path) -> dict[str, Path]:
    """Write tlora_plan.json and tlora_plan.png into `output_dir`; returns their paths."""
    output_dir = Path(output_dir)
    return {
        "json": plan.save(output_dir / PLAN_JSON),
        "heatmap": save_plan_heatmap(plan, output_dir / PLAN_HEATMAP),
    }
