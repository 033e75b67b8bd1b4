"""Part 2 — calibration memory at real scale: the statistics of ONE decoder layer with Llama-2-7B shapes (hidden 4096,
intermediate 11008, 32 heads), measured on a one-layer model, extrapolated to 32 layers and set beside the model's
own size and the all-C layout; once with the statistics on each module's device (default) and once offloaded to the
CPU (`statistics_device="cpu"`, the same thing on a CPU-only machine).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

from common import (
    LLAMA_TARGETS,
    Case,
    LlamaSize,
    Settings,
    calibration_set,
    current_rss_mib,
    fmt,
    machine_info,
    markdown_table,
    med,
    memory_record,
    part_header,
    random_examples,
    random_llama,
    reset_peak_memory,
    run_interleaved,
    stopwatch,
    summarise_runs,
    target_check,
    targets_markdown,
    write_json,
)

PART = "memory"
GB = 10**9  # decimal gigabytes, as the method page states its figures (22 GB, 12.2 GB, 13.5 GB)
LLAMA2_7B = {"hidden": 4096, "intermediate": 11008, "layers": 32, "vocab": 32000, "heads": 32}


def sizes(scale: str) -> dict[str, Any]:
    """The one-layer model and the few sequences run through it."""
    if scale == "tiny":
        model = LlamaSize(hidden_size=32, num_layers=1, intermediate_size=80, num_heads=2, vocab_size=64)
        return {"model": model.__dict__, "num_samples": 2, "seq_len": 8, "batch_size": 2, "extrapolate_layers": 32}
    if scale == "quick":
        model = LlamaSize(hidden_size=256, num_layers=1, intermediate_size=688, num_heads=4, vocab_size=512)
        return {"model": model.__dict__, "num_samples": 4, "seq_len": 32, "batch_size": 2, "extrapolate_layers": 32}
    model = LlamaSize(hidden_size=LLAMA2_7B["hidden"], num_layers=1, intermediate_size=LLAMA2_7B["intermediate"],
                      num_heads=LLAMA2_7B["heads"], vocab_size=512)
    return {"model": model.__dict__, "num_samples": 8, "seq_len": 128, "batch_size": 4, "extrapolate_layers": 32}


def layer_statistics_bytes(hidden: int, intermediate: int, layout: str, bytes_per_value: int = 4) -> int:
    """Statistics bytes of one Llama decoder layer under a layout.

    * "per_module_c": one n x n covariance per projection (7 of them, nothing shared);
    * "all_c": one covariance per distinct input (q/k/v share one, gate/up share one, o and down have their own);
    * "tlora": as "all_c" but down_proj (out < in, own input) accumulates M = W C (out x in) instead of C.
    """
    h, i = hidden, intermediate
    if layout == "per_module_c":
        values = 6 * h * h + i * i
    elif layout == "all_c":
        values = 3 * h * h + i * i
    elif layout == "tlora":
        values = 3 * h * h + h * i
    else:
        raise ValueError(layout)
    return values * bytes_per_value


def llama_parameters(hidden: int, intermediate: int, layers: int, vocab: int) -> int:
    """Parameters of a Llama with untied embeddings (Llama-2-7B: 6.74 B)."""
    per_layer = 4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden
    return layers * per_layer + 2 * vocab * hidden + hidden


# ---------------------------------------------------------------------------------------------------------------
# Case (run inside a worker process)
# ---------------------------------------------------------------------------------------------------------------


def measure_layer_statistics(
    model: dict, num_samples: int, seq_len: int, batch_size: int, device: str, statistics_device: Optional[str],
    **_: Any,
) -> dict:
    """Calibrate one decoder layer; report the statistics' bytes by layout and the process's memory."""
    from tlora import TLoRAConfig, compute_statistics

    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    llama = random_llama(model, device=device, seed=0, dtype=dtype)
    calibration = calibration_set(random_examples(num_samples, seq_len, model["vocab_size"], seed=1))
    config = TLoRAConfig(r=8, lora_alpha=8, target_modules=list(LLAMA_TARGETS), task_type="CAUSAL_LM",
                         statistics_device=statistics_device)
    record: dict[str, Any] = {"statistics_device": statistics_device or "module device", "model_dtype": dtype,
                              "model_parameters": sum(p.numel() for p in llama.parameters())}
    rss = current_rss_mib()
    reset_peak_memory(device)
    with stopwatch(device, record, "calibration_s"):
        statistics = compute_statistics(llama, calibration.loader(batch_size), config, show_progress=False)
    record["statistics_bytes"] = statistics.nbytes()
    record["covariance_bytes"] = sum(t.numel() * t.element_size() for t in statistics.covariances.values())
    record["cross_covariance_bytes"] = sum(t.numel() * t.element_size() for t in statistics.cross_covariances.values())
    record["statistics_on"] = sorted({str(t.device) for t in statistics.covariances.values()}
                                     | {str(t.device) for t in statistics.cross_covariances.values()})
    record["layouts"] = {r.name.split(".")[-1]: r.layout for r in statistics.modules}
    record.update(memory_record(device, rss))
    return record


def measure_layer_statistics_in_passes(
    model: dict, num_samples: int, seq_len: int, batch_size: int, device: str, passes: int, **_: Any,
) -> dict:
    """`statistics_passes`: calibrate one decoder layer in `passes` passes, in the pipeline's order (the
    forward+backward pass first, then the forward-only ones), freeing each pass's statistics before the next as the
    pipeline does; report the largest pass's bytes and the peak memory, then compare every statistic with one
    exact pass over the same data (the mode is exact: the difference should be 0)."""
    from tlora import TLoRAConfig, compute_statistics
    from tlora.calibration import PassShare

    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    llama = random_llama(model, device=device, seed=0, dtype=dtype)
    calibration = calibration_set(random_examples(num_samples, seq_len, model["vocab_size"], seed=1))
    config = TLoRAConfig(r=8, lora_alpha=8, target_modules=list(LLAMA_TARGETS), task_type="CAUSAL_LM")
    record: dict[str, Any] = {"passes": passes, "model_dtype": dtype,
                              "model_parameters": sum(p.numel() for p in llama.parameters())}
    rss = current_rss_mib()
    reset_peak_memory(device)
    pass_bytes, pass_seconds, kept = [], [], {}
    for index in [passes - 1, *range(passes - 1)]:
        share = PassShare(index, passes, sensitivity=index == passes - 1)
        started = time.perf_counter()
        statistics = compute_statistics(llama, calibration.loader(batch_size), config, show_progress=False,
                                        share=share)
        pass_seconds.append(time.perf_counter() - started)
        pass_bytes.append(statistics.nbytes())
        # A strided sample of each statistic (about 4096 values), kept for the comparison with one pass below.
        for key, value in {**statistics.covariances, **statistics.cross_covariances}.items():
            kept[key] = value.double().flatten()[:: max(1, value.numel() // 4096)].clone()
        del statistics
    record.update(memory_record(device, rss))
    record["statistics_bytes"] = max(pass_bytes)
    record["pass_statistics_bytes"] = pass_bytes
    record["pass_seconds"] = pass_seconds
    record["calibration_s"] = sum(pass_seconds)
    started = time.perf_counter()
    whole = compute_statistics(llama, calibration.loader(batch_size), config, show_progress=False)
    record["one_pass_s"] = time.perf_counter() - started
    record["one_pass_statistics_bytes"] = whole.nbytes()
    difference = 0.0
    for key, value in {**whole.covariances, **whole.cross_covariances}.items():
        sampled = value.double().flatten()[:: max(1, value.numel() // 4096)]
        difference = max(difference, float((kept[key] - sampled).abs().max() / sampled.abs().max().clamp_min(1e-30)))
    record["max_relative_difference_from_one_pass"] = difference
    record["same_keys_as_one_pass"] = sorted(kept) == sorted({**whole.covariances, **whole.cross_covariances})
    return record


# ---------------------------------------------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------------------------------------------


def run(settings: Settings, log: Callable[[str], None] = print) -> dict:
    """Run part 2 and write bench/results/memory.json."""
    started = time.time()
    machine = machine_info(settings.device)
    config = sizes(settings.scale)
    common = {key: config[key] for key in ("model", "num_samples", "seq_len", "batch_size")}
    cases = [
        Case("default", PART, "measure_layer_statistics", {**common, "device": settings.device, "statistics_device": None}),
        Case("offload_cpu", PART, "measure_layer_statistics",
             {**common, "device": settings.device, "statistics_device": "cpu"}),
        Case("passes_2", PART, "measure_layer_statistics_in_passes", {**common, "device": settings.device, "passes": 2}),
    ]
    log(f"memory: {len(cases)} cases x {settings.repeats} repeats on {settings.device}")
    runs = run_interleaved(cases, settings, progress=log)
    data = part_header(PART, settings, machine, started)
    data["config"] = config
    data["runs"] = runs
    data["summary"] = {name: summarise_runs(case_runs) for name, case_runs in runs.items()}
    data["extrapolation"] = extrapolate(config, data["summary"], runs)
    passes = data["extrapolation"].get("passes_2", {})
    data["targets"] = [
        target_check("statistics / model bf16 at 7B shapes, exact mode (statistics_passes=2)",
                     passes.get("extrapolated_over_model_bf16"), 0.5),
        target_check("statistics_passes=2: max relative difference from one pass",
                     passes.get("max_relative_difference_from_one_pass"), 0.0),
    ]
    data["duration_s"] = time.time() - started
    write_json(settings, PART, data)
    return data


def extrapolate(config: dict, summary: dict, runs: dict) -> dict:
    """Measured per-layer bytes x layers, beside the analytic layouts and the size of the model itself."""
    model = config["model"]
    layers = config["extrapolate_layers"]
    hidden, intermediate = model["hidden_size"], model["intermediate_size"]
    parameters = llama_parameters(hidden, intermediate, layers, LLAMA2_7B["vocab"])
    result: dict[str, Any] = {
        "layers": layers,
        "model_parameters": parameters,
        "model_bf16_gb": parameters * 2 / GB,
        "model_fp32_gb": parameters * 4 / GB,
        "analytic_per_layer_bytes": {
            layout: layer_statistics_bytes(hidden, intermediate, layout)
            for layout in ("per_module_c", "all_c", "tlora")
        },
    }
    result["analytic_total_gb"] = {k: v * layers / GB for k, v in result["analytic_per_layer_bytes"].items()}
    for name, case in summary.items():
        measured = med(case, "statistics_bytes")
        result[name] = {
            "measured_per_layer_bytes": measured,
            "measured_matches_tlora_layout": measured == result["analytic_per_layer_bytes"]["tlora"],
            "extrapolated_gb": measured * layers / GB if measured is not None else None,
            "extrapolated_over_model_bf16": (measured * layers / GB) / result["model_bf16_gb"] if measured else None,
            "calibration_overhead_per_layer_mib": med(case, "peak_above_start_mib"),
            "layouts": runs[name][0].get("layouts"),
            "statistics_on": runs[name][0].get("statistics_on"),
        }
        if "passes" in runs[name][0]:
            result[name].update({
                "passes": runs[name][0]["passes"],
                "time_over_one_pass": med(case, "calibration_s") / med(case, "one_pass_s"),
                "max_relative_difference_from_one_pass": max(r["max_relative_difference_from_one_pass"]
                                                             for r in runs[name]),
            })
    return result


def markdown(data: dict) -> str:
    """The part's section of SUMMARY.md."""
    config, extrapolation, summary = data["config"], data["extrapolation"], data["summary"]
    model = config["model"]
    layers = extrapolation["layers"]
    lines = [
        "## 2. Calibration memory at real scale",
        "",
        f"One decoder layer with hidden {model['hidden_size']}, intermediate {model['intermediate_size']}, "
        f"{model['num_heads']} heads, calibrated on {config['num_samples']} sequences x {config['seq_len']} tokens "
        f"(batch {config['batch_size']}); statistics in float32; extrapolated x{layers} layers. Model with these shapes "
        f"and {layers} layers: {extrapolation['model_parameters'] / 1e9:.2f} B parameters = "
        f"{extrapolation['model_bf16_gb']:.1f} GB in bf16 ({extrapolation['model_fp32_gb']:.1f} GB in fp32); "
        "GB = 10^9 bytes, MiB = 2^20 bytes.",
        "",
    ]
    rows = []
    analytic = extrapolation["analytic_total_gb"]
    for layout, label in (("per_module_c", "one C per projection (nothing shared)"),
                          ("all_c", "one C per distinct input (q/k/v and gate/up share)"),
                          ("tlora", "TLoRA layout: shared C, M = W C for down_proj")):
        rows.append([f"analytic: {label}", fmt(extrapolation["analytic_per_layer_bytes"][layout] / 2**20, 1),
                     fmt(analytic[layout], 2), fmt(analytic[layout] / extrapolation["model_bf16_gb"], 2), "—", "—"])
    for name in summary:
        entry = extrapolation[name]
        label = {"default": "measured, statistics on the module's device",
                 "offload_cpu": "measured, statistics offloaded (statistics_device='cpu')",
                 "passes_2": "measured, statistics_passes=2 (largest pass)"}.get(name, name)
        rows.append([label, fmt((entry["measured_per_layer_bytes"] or 0) / 2**20, 1), fmt(entry["extrapolated_gb"], 2),
                     fmt(entry["extrapolated_over_model_bf16"], 2), fmt(entry["calibration_overhead_per_layer_mib"], 0),
                     fmt(med(summary[name], "peak_accelerator_mib"), 0)])
    lines += [markdown_table(["statistics", "per layer MiB", f"x{layers} layers GB", "/ model bf16",
                              "peak RSS above start, 1 layer MiB", "peak GPU MiB"], rows), ""]
    default = extrapolation.get("default", {})
    if default:
        lines += [f"Measured layout per module: {default.get('layouts')}; matches the analytic TLoRA layout: "
                  f"{fmt(default.get('measured_matches_tlora_layout'))}. Statistics held on: "
                  f"{default.get('statistics_on')} (default) / "
                  f"{extrapolation.get('offload_cpu', {}).get('statistics_on')} (offload). The peak above start also "
                  "holds the layer's activations and transient per-sample gradients (one m x n matrix at a time); "
                  "only the statistics are extrapolated.", ""]
    passes = extrapolation.get("passes_2")
    if passes:
        lines += [f"statistics_passes=2 holds at most the largest pass's share: on one layer the split is by module "
                  f"(q/k/v, o and gate/up C in one pass, down_proj's W C in the other), so x{layers} is an upper "
                  "bound — with many layers the passes split at about half. It is exact: the statistics differ from "
                  f"one pass's by {fmt(passes['max_relative_difference_from_one_pass'])} (max relative, sampled), "
                  f"and the passes took {fmt(passes['time_over_one_pass'], 2)}x one pass's time on this machine "
                  "(measured on one layer; the forward-only pass stops after its last module).", ""]
    if data.get("targets"):
        lines += targets_markdown(data["targets"])
    return "\n".join(lines)
