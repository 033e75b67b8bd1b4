"""Part 1 — initialisation cost: TLoRA's calibration pass and decompositions against PEFT's data-free and data-driven
initialisations (PiSSA, OLoRA, CorDA, EVA, LoRA-GA) and against the floor (the same number of plain forward passes,
and of forward+backward passes with gradients on the target weights only), on one random Llama and one calibration
set. Every case runs in a fresh process; repetitions are interleaved; TLoRA is reported as ratios to each case.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from pathlib import Path
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
    method_context,
    memory_record,
    paired_ratio,
    part_header,
    random_examples,
    random_llama,
    ratio,
    reset_peak_memory,
    run_interleaved,
    stopwatch,
    summarise_runs,
    target_check,
    targets_markdown,
    write_json,
)

PART = "init_cost"
SVD_METHODS = ("gram", "exact", "randomized")
PEFT_DATA_FREE = ("lora", "pissa", "pissa_niter_4", "olora")


def sizes(scale: str) -> dict[str, Any]:
    """Model, data and rank of the part (the issue's: h=512, 8 layers, 64 x 256 tokens, r=32)."""
    if scale == "tiny":
        return {
            "model": LlamaSize(hidden_size=32, num_layers=1, intermediate_size=64, num_heads=2, vocab_size=64).__dict__,
            "num_samples": 4,
            "seq_len": 8,
            "r": 2,
            "tlora_batch_sizes": [1, 2],
            "floor_batch_sizes": [1, 2],
            "loraga_batch_sizes": [2],
            "eva_batch_size": 2,
            "eva_max_passes": 1,
        }
    if scale == "quick":
        return {
            "model": LlamaSize(hidden_size=128, num_layers=2, intermediate_size=344, num_heads=4, vocab_size=1000).__dict__,
            "num_samples": 16,
            "seq_len": 64,
            "r": 8,
            "tlora_batch_sizes": [1, 4],
            "floor_batch_sizes": [1, 4],
            "loraga_batch_sizes": [1, 4],
            "eva_batch_size": 4,
            "eva_max_passes": 2,
        }
    return {
        "model": LlamaSize().__dict__,
        "num_samples": 64,
        "seq_len": 256,
        "r": 32,
        "tlora_batch_sizes": [1, 8],
        "floor_batch_sizes": [1, 8],
        "loraga_batch_sizes": [1, 8],
        "eva_batch_size": 8,
        "eva_max_passes": 1,
    }


# ---------------------------------------------------------------------------------------------------------------
# Cases (run inside worker processes)
# ---------------------------------------------------------------------------------------------------------------


def _setup(model: dict, num_samples: int, seq_len: int, device: str):
    """The random Llama and the calibration set every case of this part uses."""
    llama = random_llama(model, device=device, seed=0)
    calibration = calibration_set(random_examples(num_samples, seq_len, model["vocab_size"], seed=1))
    return llama, calibration


def _on(batch: dict, device: str) -> dict:
    return {key: value.to(device) for key, value in batch.items()}


def measure_forward(model: dict, num_samples: int, seq_len: int, batch_size: int, device: str, **_: Any) -> dict:
    """Floor: plain forward passes without gradients over the calibration samples."""
    import torch

    llama, calibration = _setup(model, num_samples, seq_len, device)
    loader = calibration.loader(batch_size)
    record: dict[str, Any] = {"batch_size": batch_size}
    rss = current_rss_mib()
    reset_peak_memory(device)
    with torch.no_grad(), stopwatch(device, record, "wall_s"):
        for batch in loader:
            llama(**_on(batch, device))
    record.update(memory_record(device, rss))
    return record


def measure_forward_backward(
    model: dict, num_samples: int, seq_len: int, batch_size: int, device: str, **_: Any
) -> dict:
    """Floor: forward + backward passes with gradients on the target weights only (accumulated, as LoRA-GA does)."""
    import torch

    llama, calibration = _setup(model, num_samples, seq_len, device)
    llama.requires_grad_(False)
    targets = [m for n, m in llama.named_modules() if n.split(".")[-1] in LLAMA_TARGETS]
    for module in targets:
        module.weight.requires_grad_(True)
    loader = calibration.loader(batch_size)
    record: dict[str, Any] = {"batch_size": batch_size, "num_target_weights": len(targets)}
    rss = current_rss_mib()
    reset_peak_memory(device)
    with torch.enable_grad(), stopwatch(device, record, "wall_s"):
        for batch in loader:
            llama(**_on(batch, device)).loss.backward()
    record.update(memory_record(device, rss))
    return record


def _tlora_config(r: int, svd_method: str = "gram"):
    from tlora import TLoRAConfig

    return TLoRAConfig(r=r, lora_alpha=r, target_modules=list(LLAMA_TARGETS), task_type="CAUSAL_LM", svd_method=svd_method)


def measure_tlora(
    model: dict,
    num_samples: int,
    seq_len: int,
    batch_size: int,
    device: str,
    r: int,
    svd_methods: list[str] = list(SVD_METHODS),
    default_svd: str = "gram",
    statistics_path: Optional[str] = None,
    **_: Any,
) -> dict:
    """TLoRA: calibration pass, plan, A by every SVD method (errors vs exact), PEFT adapter; each step timed."""
    from tlora import apply_plan, compute_lora_A, compute_statistics, find_target_modules, plan_from_statistics

    llama, calibration = _setup(model, num_samples, seq_len, device)
    config = _tlora_config(r, default_svd)
    record: dict[str, Any] = {"batch_size": batch_size}
    rss = current_rss_mib()
    reset_peak_memory(device)
    with stopwatch(device, record, "targets_s"):
        targets = find_target_modules(llama, config)
    with stopwatch(device, record, "calibration_s"):
        statistics = compute_statistics(llama, calibration.loader(batch_size), config, targets=targets, show_progress=False)
    record["peak_rss_after_calibration_mib"] = memory_record(device, rss)["peak_rss_mib"]
    record["statistics_mib"] = statistics.nbytes() / 2**20
    with stopwatch(device, record, "plan_s"):
        plan = plan_from_statistics(statistics, config)
    lora_A: dict[str, dict] = {}
    for method in svd_methods:
        with stopwatch(device, record, f"decomposition_{method}_s"):
            lora_A[method] = compute_lora_A(
                targets,
                statistics,
                plan,
                method=method,
                oversampling=config.svd_oversampling,
                niter=config.svd_niter,
                show_progress=False,
            )
    record.update(_subspace_errors(targets, statistics, lora_A))
    with stopwatch(device, record, "apply_s"):
        peft_model = apply_plan(llama, plan, lora_A[default_svd], config)
    record["total_s"] = (
        record["targets_s"] + record["calibration_s"] + record["plan_s"]
        + record[f"decomposition_{default_svd}_s"] + record["apply_s"]
    )
    record["decomposition_share"] = record[f"decomposition_{default_svd}_s"] / record["total_s"]
    record["trainable_parameters"] = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    record["lora_trainable_parameters"] = plan.lora_trainable_parameters
    record["total_rank"] = plan.total_rank
    record["dropped_modules"] = len(plan.dropped_modules)
    record.update(memory_record(device, rss))
    if statistics_path:
        statistics.save(statistics_path)
    return record


def _subspace_errors(targets, statistics, lora_A: dict[str, dict]) -> dict:
    """Per SVD method: largest and mean projector distance to the exact top-r_l subspace, and the smallest and
    mean captured-energy ratio ||M V||^2 / ||M V_exact||^2 (1.0 = as good as exact)."""
    import torch
    from tlora import projector_distance
    from tlora.initialization import captured_energy

    if "exact" not in lora_A:
        return {}
    by_name = {t.name: t for t in targets}
    record: dict[str, Any] = {}
    distances: dict[str, list] = {m: [] for m in lora_A if m != "exact"}
    energies: dict[str, list] = {m: [] for m in lora_A if m != "exact"}
    for name, reference in lora_A["exact"].items():
        weight = by_name[name].weight_matrix(torch.float64)
        product = statistics.weighted_covariance(name, weight.to(_stored_device(statistics, name)))
        for method in distances:
            candidate = lora_A[method][name]
            distances[method].append(projector_distance(candidate, reference))
            energies[method].append(captured_energy(product, candidate.to(product.device), reference.to(product.device)))
    for method in distances:
        values, energy = distances[method], energies[method]
        record[f"subspace_distance_{method}_max"] = max(values) if values else 0.0
        record[f"subspace_distance_{method}_mean"] = sum(values) / len(values) if values else 0.0
        record[f"captured_energy_{method}_min"] = min(energy) if energy else 1.0
        record[f"captured_energy_{method}_mean"] = sum(energy) / len(energy) if energy else 1.0
    return record


def _stored_device(statistics, name: str):
    record = statistics.module(name)
    stored = statistics.covariances.get(record.covariance_key, statistics.cross_covariances.get(name))
    return stored.device


def measure_peft_init(model: dict, num_samples: int, seq_len: int, device: str, r: int, init: str, **_: Any) -> dict:
    """A data-free PEFT initialisation (LoRA's default, PiSSA, PiSSA with fast SVD, OLoRA): `get_peft_model` timed."""
    from peft import get_peft_model

    from tlora.training.methods import lora_config

    llama, calibration = _setup(model, num_samples, seq_len, device)
    directory = tempfile.mkdtemp(prefix="tlora-bench-")
    try:
        context = method_context(llama, "lora", r, 1, calibration, directory, device)
        config = lora_config(context) if init == "lora" else lora_config(context, init_lora_weights=init)
        record: dict[str, Any] = {"init_lora_weights": init}
        rss = current_rss_mib()
        reset_peak_memory(device)
        with stopwatch(device, record, "total_s"):
            get_peft_model(llama, config)
        record.update(memory_record(device, rss))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return record


def measure_builder(
    model: dict, num_samples: int, seq_len: int, batch_size: int, device: str, r: int, method: str,
    eva_max_passes: int = 4, **_: Any
) -> dict:
    """A calibrated PEFT initialisation (LoRA-GA, CorDA, EVA) built by the training core's method registry; the time is
    the builder's own `calibration_seconds` (preprocessing + adapter creation, not the save of the initial adapter)."""
    from tlora.training.registry import build_method

    llama, calibration = _setup(model, num_samples, seq_len, device)
    directory = tempfile.mkdtemp(prefix="tlora-bench-")
    try:
        context = method_context(llama, method, r, batch_size, calibration, directory, device, eva_max_passes)
        record: dict[str, Any] = {"method": method, "batch_size": 1 if method == "corda" else batch_size}
        rss = current_rss_mib()
        reset_peak_memory(device)
        with stopwatch(device, record, "builder_wall_s"):
            built = build_method(context)
        record["total_s"] = built.calibration_seconds
        for key in ("forward_calls", "converged"):
            if key in built.details:
                record[key] = built.details[key]
        if method == "eva":
            record["eva_max_passes"] = eva_max_passes
            record["seconds_per_forward_call"] = built.calibration_seconds / max(1, built.details.get("forward_calls", 1))
            record["eva_forward_call_bound"] = eva_max_passes * math.ceil(num_samples / batch_size)
        record.update(memory_record(device, rss))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return record


def compare_statistics(reference: str, others: dict[str, str]) -> dict:
    """Largest relative differences of sensitivities and covariances between statistics files and a reference."""
    import torch
    from tlora import TLoRAStatistics

    base = TLoRAStatistics.load(reference)
    result: dict[str, Any] = {}
    for label, path in others.items():
        other = TLoRAStatistics.load(path)
        sensitivity = max(
            abs(other.sensitivity(n) - base.sensitivity(n)) / max(abs(base.sensitivity(n)), 1e-300)
            for n in base.module_names
        )
        tensors = 0.0
        for store in ("covariances", "cross_covariances"):
            mine, theirs = getattr(base, store), getattr(other, store)
            for key, value in mine.items():
                difference = torch.linalg.matrix_norm((theirs[key] - value).double())
                tensors = max(tensors, float(difference / torch.linalg.matrix_norm(value.double()).clamp_min(1e-300)))
        result[label] = {"sensitivity_max_relative_difference": sensitivity,
                         "covariance_max_relative_difference": tensors,
                         "num_samples": other.num_samples}
    return result


# ---------------------------------------------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------------------------------------------


def build_cases(config: dict, device: str, statistics_dir: Path) -> list[Case]:
    """All cases of the part, in the order used for the first repetition."""
    common = {"model": config["model"], "num_samples": config["num_samples"], "seq_len": config["seq_len"],
              "device": device, "r": config["r"]}
    cases = []
    for batch_size in config["floor_batch_sizes"]:
        cases.append(Case(f"forward_bs{batch_size}", PART, "measure_forward", {**common, "batch_size": batch_size}))
        cases.append(Case(f"forward_backward_bs{batch_size}", PART, "measure_forward_backward",
                          {**common, "batch_size": batch_size}))
    for batch_size in config["tlora_batch_sizes"]:
        cases.append(Case(f"tlora_bs{batch_size}", PART, "measure_tlora",
                          {**common, "batch_size": batch_size,
                           "statistics_path": str(statistics_dir / f"tlora_bs{batch_size}.safetensors")}))
    for init in PEFT_DATA_FREE:
        cases.append(Case(init, PART, "measure_peft_init", {**common, "init": init}))
    cases.append(Case("corda_bs1", PART, "measure_builder", {**common, "batch_size": 1, "method": "corda"}))
    for batch_size in config["loraga_batch_sizes"]:
        cases.append(Case(f"loraga_bs{batch_size}", PART, "measure_builder",
                          {**common, "batch_size": batch_size, "method": "loraga"}))
    eva_bs = config["eva_batch_size"]
    cases.append(Case(f"eva_bs{eva_bs}", PART, "measure_builder",
                      {**common, "batch_size": eva_bs, "method": "eva", "eva_max_passes": config["eva_max_passes"]}))
    return cases


def run(settings: Settings, log: Callable[[str], None] = print) -> dict:
    """Run part 1 and write bench/results/init_cost.json; returns the data."""
    started = time.time()
    machine = machine_info(settings.device)
    config = sizes(settings.scale)
    statistics_dir = Path(tempfile.mkdtemp(prefix="tlora-bench-statistics-"))
    try:
        cases = build_cases(config, settings.device, statistics_dir)
        log(f"init_cost: {len(cases)} cases x {settings.repeats} repeats on {settings.device}")
        runs = run_interleaved(cases, settings, progress=log)
        reference = statistics_dir / f"tlora_bs{config['tlora_batch_sizes'][0]}.safetensors"
        others = {f"bs{b}": str(statistics_dir / f"tlora_bs{b}.safetensors") for b in config["tlora_batch_sizes"][1:]}
        consistency = compare_statistics(str(reference), others) if others else {}
    finally:
        shutil.rmtree(statistics_dir, ignore_errors=True)
    data = part_header(PART, settings, machine, started)
    data["config"] = {**config, "targets": LLAMA_TARGETS, "svd_methods": list(SVD_METHODS), "default_svd": "gram"}
    data["runs"] = runs
    data["summary"] = {name: summarise_runs(case_runs) for name, case_runs in runs.items()}
    data["batch_size_consistency"] = consistency
    data["ratios"] = tlora_ratios(data)
    data["targets"] = target_checks(data)
    data["duration_s"] = time.time() - started
    write_json(settings, PART, data)
    return data


def _comparisons(config: dict, batch_size: int) -> dict[str, str]:
    """Baseline case -> its time key, for TLoRA at `batch_size` (same batch size where the baseline has one)."""
    baselines = {f"forward_bs{batch_size}": "wall_s", f"forward_backward_bs{batch_size}": "wall_s"}
    for init in PEFT_DATA_FREE:
        baselines[init] = "total_s"
    baselines["corda_bs1"] = "total_s"
    if batch_size in config["loraga_batch_sizes"]:
        baselines[f"loraga_bs{batch_size}"] = "total_s"
    baselines[f"eva_bs{config['eva_batch_size']}"] = "total_s"
    return baselines


def tlora_ratios(data: dict) -> dict:
    """TLoRA's calibration and whole-initialisation times as ratios to every baseline (ratio of medians, and the
    median of the per-repeat ratios)."""
    config, runs, summary = data["config"], data["runs"], data["summary"]
    ratios: dict[str, Any] = {}
    for batch_size in config["tlora_batch_sizes"]:
        name = f"tlora_bs{batch_size}"
        if name not in summary:
            continue
        entry: dict[str, Any] = {}
        for baseline, key in _comparisons(config, batch_size).items():
            if baseline not in summary:
                continue
            for what in ("calibration_s", "total_s"):
                entry[f"{what[:-2]}_over_{baseline}"] = {
                    "ratio_of_medians": ratio(med(summary[name], what), med(summary[baseline], key)),
                    "paired": paired_ratio(runs[name], runs[baseline], what, key),
                }
        ratios[name] = entry
    first = f"tlora_bs{config['tlora_batch_sizes'][0]}"
    for batch_size in config["tlora_batch_sizes"][1:]:
        name = f"tlora_bs{batch_size}"
        if name in summary and first in summary:
            ratios[f"per_sample_time_{name}_over_{first}"] = ratio(
                med(summary[name], "calibration_s"), med(summary[first], "calibration_s")
            )
    return ratios


def _ratio_value(ratios: dict, tlora: str, key: str) -> Optional[float]:
    entry = ratios.get(tlora, {}).get(key)
    return entry["ratio_of_medians"] if entry else None


def target_checks(data: dict) -> list[dict]:
    """The issue's targets for part 1, with TLoRA at its fastest batch size (and at batch size 1 for the floor)."""
    config, ratios, summary = data["config"], data["ratios"], data["summary"]
    checks = []
    for batch_size in config["tlora_batch_sizes"]:
        name = f"tlora_bs{batch_size}"
        checks.append(target_check(f"{name}: calibration / forward+backward floor (same batch size)",
                                   _ratio_value(ratios, name, f"calibration_over_forward_backward_bs{batch_size}"), 1.2))
        checks.append(target_check(f"{name}: decompositions share of the whole initialisation",
                                   med(summary[name], "decomposition_share"), 0.05))
        if batch_size in config["loraga_batch_sizes"]:
            checks.append(target_check(f"{name}: whole initialisation / LoRA-GA (bs {batch_size})",
                                       _ratio_value(ratios, name, f"total_over_loraga_bs{batch_size}"), 1.15))
        checks.append(target_check(f"{name}: whole initialisation / CorDA (IPM, bs 1)",
                                   _ratio_value(ratios, name, "total_over_corda_bs1"), 1.5))
        checks.append(_eva_check(data, name))
    first = config["tlora_batch_sizes"][0]
    for batch_size in config["tlora_batch_sizes"][1:]:
        checks.append(target_check(f"per-sample sensitivity: calibration time at bs {batch_size} / bs {first}",
                                   ratios.get(f"per_sample_time_tlora_bs{batch_size}_over_tlora_bs{first}"), 1.0, "<"))
        consistency = data["batch_size_consistency"].get(f"bs{batch_size}", {})
        checks.append(target_check(f"per-sample sensitivity: max relative difference of S_l, bs {batch_size} vs {first}",
                                   consistency.get("sensitivity_max_relative_difference"), 1e-4))
    svd_name = f"tlora_bs{first}"
    for method in ("gram", "randomized"):
        checks.append(target_check(f"decomposition '{method}': largest subspace distance to exact SVD",
                                   _max(summary[svd_name], f"subspace_distance_{method}_max"), 1e-6))
        checks.append(target_check(f"decomposition '{method}': smallest captured-energy ratio vs exact",
                                   _min(summary[svd_name], f"captured_energy_{method}_min"), 0.999, ">="))
    return checks


def _eva_check(data: dict, tlora: str) -> dict:
    """TLoRA faster than EVA. EVA stopped before converging only gives a lower bound of its time: a ratio >= 1 to
    that bound is then inconclusive (met = None), not a miss."""
    eva = f"eva_bs{data['config']['eva_batch_size']}"
    value = _ratio_value(data["ratios"], tlora, f"total_over_{eva}")
    check = target_check(f"{tlora}: whole initialisation / EVA", value, 1.0, "<")
    converged = med(data["summary"].get(eva, {}), "converged")
    if converged is not None and not converged:
        check["target"] += f" (EVA stopped unconverged after {data['config']['eva_max_passes']} pass(es): lower bound)"
        if check["met"] is False:
            check["met"] = None
    return check


def _max(summary: dict, key: str) -> Optional[float]:
    entry = summary.get(key)
    return entry["max"] if entry else None


def _min(summary: dict, key: str) -> Optional[float]:
    entry = summary.get(key)
    return entry["min"] if entry else None


# ---------------------------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------------------------

LABELS = {
    "forward": "forward passes, no grad (floor)",
    "forward_backward": "forward+backward, grads on target weights only (floor)",
    "lora": "PEFT LoRA default init (Kaiming A, B = 0)",
    "pissa": "PEFT PiSSA (exact SVD)",
    "pissa_niter_4": "PEFT PiSSA (pissa_niter_4)",
    "olora": "PEFT OLoRA",
    "corda": "PEFT CorDA (IPM; batch size 1 by design)",
    "loraga": "PEFT LoRA-GA",
    "eva": "PEFT EVA (bounded)",
}


def _label(name: str) -> str:
    base, _, batch = name.rpartition("_bs")
    if base and batch.isdigit():
        return f"{LABELS.get(base, base)}, bs {batch}"
    return LABELS.get(name, name)


def _range(summary: dict, key: str) -> str:
    entry = summary.get(key)
    if not entry or entry["median"] is None:
        return "—"
    return f"{entry['median']:.2f} [{entry['min']:.2f}–{entry['max']:.2f}]"


def markdown(data: dict) -> str:
    """The part's section of SUMMARY.md."""
    config, summary, ratios = data["config"], data["summary"], data["ratios"]
    model = config["model"]
    lines = [
        "## 1. Initialisation cost",
        "",
        f"Random Llama: hidden {model['hidden_size']}, {model['num_layers']} layers, intermediate "
        f"{model['intermediate_size']}, vocab {model['vocab_size']}; {len(config['targets'])} projection types "
        f"({LlamaSize(**model).num_targets} target modules); r = {config['r']}; {config['num_samples']} calibration "
        f"sequences x {config['seq_len']} tokens. Medians [min–max] of {data['settings']['repeats']} interleaved "
        f"repetitions, each case in a fresh process. EVA bounded at {config['eva_max_passes']} passes over the "
        "calibration samples (PEFT's loop has no limit and does not converge on a random model).",
        "",
    ]
    tlora_names = [f"tlora_bs{b}" for b in config["tlora_batch_sizes"] if f"tlora_bs{b}" in summary]
    headers = ["case", "wall s", "peak RSS MiB"] + [f"TLoRA bs {n.rsplit('bs', 1)[1]} / case" for n in tlora_names]
    rows = []
    for name, case in summary.items():
        if name.startswith("tlora_"):
            continue
        key = "wall_s" if "wall_s" in case else "total_s"
        cells = [_label(name), _range(case, key), fmt(med(case, "peak_rss_mib"), 0)]
        for tlora in tlora_names:
            entry = ratios.get(tlora, {}).get(f"total_over_{name}")
            if name.startswith("forward"):
                entry = ratios.get(tlora, {}).get(f"calibration_over_{name}")
            cells.append(fmt(entry["ratio_of_medians"]) if entry else "—")
        if name.startswith("eva") and med(case, "forward_calls") is not None:
            converged = bool(med(case, "converged"))
            cells[0] += (f" ({int(med(case, 'forward_calls'))} forward calls of bs {config['eva_batch_size']}, "
                         f"{med(case, 'seconds_per_forward_call'):.2f} s each; converged: {fmt(converged)}"
                         f"{'' if converged else ' — a lower bound'})")
        rows.append(cells)
    lines += [markdown_table(headers, rows), "",
              "Ratios against the floors use TLoRA's calibration pass alone; against the PEFT methods, TLoRA's whole "
              "initialisation (calibration + plan + decompositions + adapter creation).", ""]
    rows = []
    for name in tlora_names:
        case = summary[name]
        rows.append([
            name.replace("tlora_", "TLoRA "), _range(case, "calibration_s"), _range(case, "plan_s"),
            _range(case, "decomposition_gram_s"), _range(case, "decomposition_exact_s"),
            _range(case, "decomposition_randomized_s"), _range(case, "apply_s"), _range(case, "total_s"),
            fmt(100 * (med(case, "decomposition_share") or 0), 1) + " %", fmt(med(case, "peak_rss_mib"), 0),
            fmt(med(case, "statistics_mib"), 1),
        ])
    lines += ["TLoRA, step by step (s):", "",
              markdown_table(["run", "calibration", "plan", "SVD gram", "SVD exact", "SVD randomized", "apply",
                              "whole init (gram)", "decomp. share", "peak RSS MiB", "statistics MiB"], rows), ""]
    if tlora_names:
        case = summary[tlora_names[0]]
        rows = []
        for method in ("gram", "randomized"):
            rows.append([method, _range(case, f"decomposition_{method}_s"),
                         fmt(_max(case, f"subspace_distance_{method}_max"), 3),
                         fmt(med(case, f"subspace_distance_{method}_mean"), 3),
                         fmt(_min(case, f"captured_energy_{method}_min"), 6)])
        rows.append(["exact", _range(case, "decomposition_exact_s"), "0 (reference)", "0", "1"])
        lines += ["Decompositions against the exact SVD (projector distance of the top-r_l right singular subspaces, "
                  "0 = identical, 1 = orthogonal; captured energy ||W C V||² relative to exact):", "",
                  markdown_table(["svd_method", "time s", "max distance", "mean distance", "min energy ratio"], rows),
                  ""]
    if data.get("batch_size_consistency"):
        first = config["tlora_batch_sizes"][0]
        rows = []
        for label, entry in data["batch_size_consistency"].items():
            batch_size = int(label[2:])
            rows.append([f"{batch_size} vs {first}",
                         fmt(ratios.get(f"per_sample_time_tlora_bs{batch_size}_over_tlora_bs{first}")),
                         fmt(entry["sensitivity_max_relative_difference"], 3),
                         fmt(entry["covariance_max_relative_difference"], 3)])
        lines += ["Per-sample sensitivity inside batched passes:", "",
                  markdown_table(["batch sizes", "calibration time ratio", "max rel. diff. S_l",
                                  "max rel. diff. C / W C"], rows), ""]
    lines += targets_markdown(data["targets"])
    return "\n".join(lines)
