"""The plan as a table, as JSON and as a heatmap."""

import json

from tlora import derive_plan, format_plan_table, save_plan_heatmap, write_plan_reports
from tlora.allocation import ModuleInfo


def _plan():
    modules = []
    for layer in range(3):
        for kind, (m, n) in {"self_attn.q_proj": (64, 64), "mlp.down_proj": (64, 172)}.items():
            modules.append(ModuleInfo(f"model.layers.{layer}.{kind}", m, n, float(1 + layer + (kind == "mlp.down_proj"))))
    return derive_plan(modules, r=8, lora_alpha=16)


def test_table_lists_rank_and_scale_per_layer_and_type_and_the_parameter_counts():
    plan = _plan()
    table = format_plan_table(plan)
    header, *rows = table.splitlines()
    assert header.split() == ["layer", "q_proj", "down_proj"]
    first = plan.module("model.layers.0.self_attn.q_proj")
    assert f"{first.rank}/{first.scaling:.3g}" in rows[0]
    assert f"TLoRA {plan.trainable_parameters:,}" in table
    assert f"LoRA r=8 {plan.lora_trainable_parameters:,}" in table


def test_reports_are_written_where_asked(tmp_path):
    plan = _plan()
    paths = write_plan_reports(plan, tmp_path / "run")
    assert paths["json"].name == "tlora_plan.json"
    data = json.loads(paths["json"].read_text())
    assert [m["rank"] for m in data["modules"]] == [m.rank for m in plan.modules]
    assert data["trainable_parameters"] == plan.trainable_parameters
    png = paths["heatmap"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width > 200 and height > 100


def test_heatmap_handles_modules_without_a_layer_index(tmp_path):
    plan = derive_plan([ModuleInfo("head.proj", 8, 8, 1.0), ModuleInfo("model.layers.0.q", 8, 8, 1.0)], r=2, lora_alpha=2)
    assert save_plan_heatmap(plan, tmp_path / "x_plan.png").stat().st_size > 1000
