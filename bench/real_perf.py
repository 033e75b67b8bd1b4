"""Part "real_perf" — TLoRA's costs on the shapes of a real model (SmolLM2-135M-Instruct: 30 layers, 210 target
projections, hidden 576, GQA 9/3 heads, vocabulary 49,152), a quick part that can be rerun alone:

(a) calibration: `tlora.compute_statistics` against its floor, the same forward+backward passes with gradients on the
    210 target weights only, on `num_batches` x `batch_size` MATH training rows (solution + `The answer is: ...`,
    tokenized by the training core, cut at `cutoff_len`); then one profiled run of each (torch.profiler, operator
    self times) to show where the extra time goes: TLoRA's running sums (covariance and `W C` products, the only
    `addmm_` calls), other matrix products (per-sample gradients against the floor's batched ones), elementwise
    work (|W * grad|, centring), the loss split (log-softmax / gathers of the per-sample losses), and Python
    (hooks, per-sample loops: the wall time the operators do not account for);
(b) decomposition: how many modules the `gram` route sends to the exact-SVD fallback on these real spectra (its
    a-priori bound eps * lambda_1 / (lambda_k - lambda_k+1) against the tolerance), the time of `gram` against
    `exact`, and the subspace error of the Gram route with the fallback switched off (so that a looser tolerance can
    be judged by its measured accuracy);
(c) generation: the evaluation's HF backend (`tlora.evaluation.generation.HFBackend`) against a plain
    `model.generate` on the same prompts (GSM8K questions in the Alpaca prompt), the same batches and token limit,
    after one untimed warm-up pass, alternating A B B A in one process, with the completions compared.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

from common import (
    LLAMA_TARGETS,
    Case,
    Settings,
    current_rss_mib,
    fmt,
    machine_info,
    markdown_table,
    med,
    memory_record,
    part_header,
    ratio,
    reset_peak_memory,
    run_case,
    run_interleaved,
    shared_data_dir,
    stopwatch,
    summarise_runs,
    target_check,
    targets_markdown,
    write_json,
)
from finetune import math_training_row

PART = "real_perf"


def sizes(scale: str) -> dict[str, Any]:
    """Sizes of the part (the issue's: 2 batches x 8 samples of <= 192 tokens, r = 32)."""
    if scale == "tiny":
        return {"model": "tiny", "num_batches": 2, "batch_size": 2, "cutoff_len": 768, "r": 4, "data_seed": 0,
                "generation_prompts": 4, "generation_batch_size": 2, "generation_max_new_tokens": 4}
    return {"model": "smollm2", "num_batches": 2, "batch_size": 8, "cutoff_len": 192, "r": 32, "data_seed": 0,
            "generation_prompts": 16, "generation_batch_size": 8,
            "generation_max_new_tokens": 32 if scale == "full" else 8}


# ---------------------------------------------------------------------------------------------------------------
# Shared set-up (inside the case processes)
# ---------------------------------------------------------------------------------------------------------------


def _model_path(model: str, work: str) -> str:
    if model == "tiny":
        from tlora.fixtures.toy_model import write_toy_model

        path = Path(work) / "tiny-llama"
        if not (path / "config.json").is_file():
            write_toy_model(path, hidden_size=32, num_layers=2)
        return str(path)
    from tlora.demo.pretrained import smollm2_path

    return str(smollm2_path())


def _load(model: str, work: str, device: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _model_path(model, work)
    tokenizer = AutoTokenizer.from_pretrained(path)
    llama = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    return llama, tokenizer


def _calibration_loader(tokenizer, data_dir: str, num_batches: int, batch_size: int, cutoff_len: int, seed: int):
    """The first num_batches x batch_size MATH rows (shuffled with `seed`) as training examples, in batches."""
    import json
    import random

    from tlora.training.data import InstructionFields, PaddingCollator, RowSource, build_instruction_dataset
    from tlora.training.data import draw_calibration_set

    lines = (Path(data_dir) / "math" / "test.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    random.Random(seed).shuffle(rows)
    source = RowSource([math_training_row(row) for row in rows[: 2 * num_batches * batch_size]], "MATH")
    dataset = build_instruction_dataset(source, InstructionFields("query", "response"), tokenizer, cutoff_len)
    collator = PaddingCollator(tokenizer.pad_token_id)
    return draw_calibration_set(dataset, num_batches * batch_size, seed, collator).loader(batch_size)


def _tlora_config(r: int):
    from tlora import TLoRAConfig


    return TLoRAConfig(r=r, lora_alpha=r, target_modules=list(LLAMA_TARGETS), task_type="CAUSAL_LM")


def _floor_pass(llama, batches, device: str) -> int:
    """Forward + backward of every batch with gradients on the target weights only; the number of target weights."""
    import torch


    llama.requires_grad_(False)
    targets = [m for n, m in llama.named_modules() if n.split(".")[-1] in LLAMA_TARGETS]
    for module in targets:
        module.weight.requires_grad_(True)
    with torch.enable_grad():
        for batch in batches:
            llama(**{k: v.to(device) for k, v in batch.items()}).loss.backward()
    for module in targets:
        module.weight.grad = None
        module.weight.requires_grad_(False)
    return len(targets)


def _tokens(batches) -> dict:
    return {"num_samples": sum(int(b["input_ids"].shape[0]) for b in batches),
            "num_tokens": sum(int(b["attention_mask"].sum()) for b in batches),
            "padded_length": max(int(b["input_ids"].shape[1]) for b in batches)}


# ---------------------------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------------------------


def measure_floor(model: str, work: str, data_dir: str, num_batches: int, batch_size: int, cutoff_len: int,
                  data_seed: int, device: str, **_: Any) -> dict:
    """(a) The floor: forward + backward, gradients on the target weights only."""
    llama, tokenizer = _load(model, work, device)
    batches = list(_calibration_loader(tokenizer, data_dir, num_batches, batch_size, cutoff_len, data_seed))
    record: dict[str, Any] = _tokens(batches)
    rss = current_rss_mib()
    reset_peak_memory(device)
    with stopwatch(device, record, "wall_s"):
        record["num_target_weights"] = _floor_pass(llama, batches, device)
    record.update(memory_record(device, rss))
    return record


def measure_calibration(model: str, work: str, data_dir: str, num_batches: int, batch_size: int, cutoff_len: int,
                        data_seed: int, device: str, r: int, statistics_path: Optional[str] = None,
                        **_: Any) -> dict:
    """(a) `compute_statistics` on the same batches (statistics saved for the decomposition case)."""
    from tlora import compute_statistics, find_target_modules

    llama, tokenizer = _load(model, work, device)
    batches = list(_calibration_loader(tokenizer, data_dir, num_batches, batch_size, cutoff_len, data_seed))
    config = _tlora_config(r)
    targets = find_target_modules(llama, config)
    record: dict[str, Any] = {**_tokens(batches), "num_targets": len(targets)}
    rss = current_rss_mib()
    reset_peak_memory(device)
    with stopwatch(device, record, "wall_s"):
        statistics = compute_statistics(llama, batches, config, targets=targets, show_progress=False)
    record.update(memory_record(device, rss))
    record["statistics_mib"] = statistics.nbytes() / 2**20
    if statistics_path and not Path(statistics_path).is_file():
        statistics.save(statistics_path)
    return record


# Operator name -> what it is doing in the calibration pass (everything else is "other operators").
OPERATOR_GROUPS = {
    # TLoRA's running sums (covariances by upper blocks, `W C` cross products) are the only in-place addmm_ calls.
    "covariance products (addmm_)": ("aten::addmm_",),
    "matrix products": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm"),
    "loss split": ("aten::log_softmax", "aten::_log_softmax", "aten::nll_loss", "aten::nll_loss_forward",
                   "aten::cross_entropy_loss", "aten::gather", "aten::_log_softmax_backward_data",
                   "aten::nll_loss_backward", "aten::logsumexp"),
    "elementwise and reductions": ("aten::abs", "aten::abs_", "aten::mul", "aten::mul_", "aten::sum", "aten::mean", "aten::sub",
                                   "aten::sub_", "aten::add_", "aten::add", "aten::div", "aten::div_",
                                   "aten::isfinite", "aten::all", "aten::any"),
    "copies and indexing": ("aten::copy_", "aten::index", "aten::index_select", "aten::to", "aten::_to_copy",
                            "aten::clone", "aten::contiguous", "aten::cat", "aten::masked_select", "aten::nonzero",
                            "aten::item", "aten::_local_scalar_dense"),
}


def _operator_profile(function: Callable[[], Any]) -> dict:
    """Wall time of `function` under torch.profiler, its operators' self CPU time by group, and the rest."""
    import torch

    started = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        function()
    wall = time.perf_counter() - started
    averages = profiler.key_averages()
    by_name = {event.key: (event.self_cpu_time_total / 1e6, event.count) for event in averages}
    groups: dict[str, float] = {}
    grouped = set()
    for group, names in OPERATOR_GROUPS.items():
        groups[group] = sum(by_name.get(name, (0.0, 0))[0] for name in names)
        grouped.update(names)
    operators = sum(seconds for seconds, _ in by_name.values())
    groups["other operators"] = operators - sum(groups.values())
    groups["python and hooks (wall - operators)"] = max(0.0, wall - operators)
    top = sorted(by_name.items(), key=lambda item: -item[1][0])[:12]
    return {"wall_s": wall, "operators_s": operators, "groups_s": groups,
            "top_operators": [{"name": n, "self_s": s, "calls": c} for n, (s, c) in top]}


def profile_calibration(model: str, work: str, data_dir: str, num_batches: int, batch_size: int, cutoff_len: int,
                        data_seed: int, device: str, r: int, **_: Any) -> dict:
    """(a) The floor and `compute_statistics` once each under torch.profiler (after one warm-up pass of the floor),
    and the difference by operator group: where the extra time goes."""
    from tlora import compute_statistics, find_target_modules

    llama, tokenizer = _load(model, work, device)
    batches = list(_calibration_loader(tokenizer, data_dir, num_batches, batch_size, cutoff_len, data_seed))
    config = _tlora_config(r)
    targets = find_target_modules(llama, config)
    _floor_pass(llama, batches[:1], device)  # warm-up
    floor = _operator_profile(lambda: _floor_pass(llama, batches, device))
    calibration = _operator_profile(
        lambda: compute_statistics(llama, batches, config, targets=targets, show_progress=False))
    extra = {group: calibration["groups_s"][group] - floor["groups_s"].get(group, 0.0)
             for group in calibration["groups_s"]}
    return {"floor": floor, "calibration": calibration, "extra_s": extra,
            "extra_total_s": calibration["wall_s"] - floor["wall_s"]}


def measure_decomposition(model: str, work: str, device: str, r: int, statistics_path: str, **_: Any) -> dict:
    """(b) Gram fallbacks on the real spectra, gram vs exact time, and the accuracy of Gram without the fallback."""
    import torch

    from tlora import TLoRAStatistics, compute_lora_A, find_target_modules, plan_from_statistics, projector_distance
    from tlora import initialization

    llama, _ = _load(model, work, device)
    config = _tlora_config(r)
    targets = find_target_modules(llama, config)
    statistics = TLoRAStatistics.load(statistics_path)
    plan = plan_from_statistics(statistics, config)
    record: dict[str, Any] = {"adapted_modules": sum(1 for m in plan.modules if m.rank > 0),
                              "tolerance": initialization.GRAM_TOLERANCE}
    bounds: list[float] = []
    original_bound = initialization._gram_error_bound

    def spy(eigenvalues, k):  # records the bound the gram route compares with its tolerance
        value = original_bound(eigenvalues, k)
        bounds.append(value)
        return value

    initialization._gram_error_bound = spy
    try:
        with stopwatch(device, record, "gram_s"):
            gram = compute_lora_A(targets, statistics, plan, method="gram", show_progress=False)
        with stopwatch(device, record, "exact_s"):
            exact = compute_lora_A(targets, statistics, plan, method="exact", show_progress=False)
        initialization.GRAM_TOLERANCE = float("inf")  # the Gram route everywhere, to measure its own accuracy
        with stopwatch(device, record, "gram_without_fallback_s"):
            pure = compute_lora_A(targets, statistics, plan, method="gram", show_progress=False)
    finally:
        initialization._gram_error_bound = original_bound
        initialization.GRAM_TOLERANCE = record["tolerance"]
    first = bounds[: record["adapted_modules"]]
    finite = sorted(b for b in first if b != float("inf"))
    record["fallbacks"] = sum(1 for b in first if b > record["tolerance"])
    record["fallback_share"] = record["fallbacks"] / max(1, len(first))
    record["bound_median"] = finite[len(finite) // 2] if finite else None
    record["bound_max_finite"] = finite[-1] if finite else None
    record["bound_infinite"] = sum(1 for b in first if b == float("inf"))
    record["gram_over_exact"] = record["gram_s"] / record["exact_s"] if record["exact_s"] else None
    distances = [projector_distance(pure[name], exact[name]) for name in exact]
    used = [projector_distance(gram[name], exact[name]) for name in exact]
    record["distance_gram_without_fallback_max"] = max(distances)
    record["distance_gram_without_fallback_mean"] = sum(distances) / len(distances)
    record["distance_gram_default_max"] = max(used)
    # The statistics are float32: their own rounding moves the top-k subspace by about
    # eps32 * sigma_1 / (sigma_k - sigma_k+1) (Davis-Kahan); a Gram error bound below that is accurate enough.
    eps32 = torch.finfo(torch.float32).eps
    record["proposed_tolerance"] = float(eps32)
    record["fallbacks_at_proposed_tolerance"] = sum(1 for b in first if b > eps32)
    return record


def measure_generation(model: str, work: str, data_dir: str, device: str, generation_prompts: int,
                       generation_batch_size: int, generation_max_new_tokens: int, **_: Any) -> dict:
    """(c) HFBackend.generate against plain model.generate: same prompts, batches and limit, an untimed warm-up
    pass, then A B B A."""
    import json

    import torch

    from tlora.evaluation.generation import DEFAULT_STOP_STRINGS, GenerationSettings, HFBackend
    from tlora.evaluation.gsm8k import build_item

    llama, tokenizer = _load(model, work, device)
    llama.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    lines = (Path(data_dir) / "gsm8k" / "test.jsonl").read_text().splitlines()[:generation_prompts]
    prompts = [build_item(index, json.loads(line)).prompt for index, line in enumerate(lines)]
    settings = GenerationSettings(max_new_tokens=generation_max_new_tokens, stop=list(DEFAULT_STOP_STRINGS),
                                  batch_size=generation_batch_size)
    backend = HFBackend(model=llama, tokenizer=tokenizer)

    def plain() -> tuple[list[str], int]:
        texts, new_tokens = [], 0
        previous = tokenizer.padding_side
        tokenizer.padding_side = "left"
        for start in range(0, len(prompts), generation_batch_size):
            inputs = tokenizer(prompts[start : start + generation_batch_size], return_tensors="pt", padding=True)
            inputs = {k: v.to(device) for k, v in inputs.items()}
            with torch.inference_mode():
                output = llama.generate(**inputs, max_new_tokens=generation_max_new_tokens, do_sample=False,
                                        pad_token_id=tokenizer.pad_token_id)
            generated = output[:, inputs["input_ids"].shape[1] :]
            new_tokens += int(generated.numel())
            texts += tokenizer.batch_decode(generated, skip_special_tokens=True)
        tokenizer.padding_side = previous
        return texts, new_tokens

    record: dict[str, Any] = {"prompts": len(prompts), "batch_size": generation_batch_size,
                              "max_new_tokens": generation_max_new_tokens, "backend_s": [], "plain_s": []}
    backend_texts: list[str] = []
    plain_texts: list[str] = []
    # One untimed pass first: the process's first generation pays one-off warm-up (allocator, kernel selection per
    # shape) that would otherwise be charged to whichever case runs first.
    started = time.perf_counter()
    plain()
    record["warm_up_s"] = time.perf_counter() - started
    for which in ("backend", "plain", "plain", "backend"):
        started = time.perf_counter()
        if which == "backend":
            backend_texts = backend.generate(prompts, settings)
        else:
            plain_texts, record["plain_new_tokens"] = plain()
        record[f"{which}_s"].append(time.perf_counter() - started)
    record["backend_median_s"] = sorted(record["backend_s"])[0] / 2 + sorted(record["backend_s"])[1] / 2
    record["plain_median_s"] = sorted(record["plain_s"])[0] / 2 + sorted(record["plain_s"])[1] / 2
    record["throughput_backend_over_plain"] = record["plain_median_s"] / record["backend_median_s"]
    from tlora.evaluation.generation import truncate_at_stop

    record["same_completions"] = sum(
        truncate_at_stop(a, settings.stop).strip() == b.strip() for a, b in zip(plain_texts, backend_texts))
    return record


# ---------------------------------------------------------------------------------------------------------------
# The part
# ---------------------------------------------------------------------------------------------------------------


def run(settings: Settings, log: Callable[[str], None] = print) -> dict:
    """Run (a), (b) and (c); write bench/results/real_perf.json."""

    started = time.time()
    config = sizes(settings.scale)
    machine = machine_info(settings.device)
    data_dir = str(shared_data_dir(settings.extra.get("data_dir")))
    work = tempfile.mkdtemp(prefix="tlora-real-perf-")
    try:
        common = {**config, "work": work, "data_dir": data_dir, "device": settings.device}
        statistics_path = str(Path(work) / "statistics.safetensors")
        cases = [Case("floor", "real_perf", "measure_floor", common),
                 Case("compute_statistics", "real_perf", "measure_calibration",
                      {**common, "statistics_path": statistics_path})]
        runs = run_interleaved(cases, settings, progress=log)
        summary = {name: summarise_runs(results) for name, results in runs.items()}
        profile = run_case(Case("profile", "real_perf", "profile_calibration", common), settings)
        log(f"profile: extra {profile['extra_total_s']:.1f} s")
        decomposition = run_case(Case("decomposition", "real_perf", "measure_decomposition",
                                      {**common, "statistics_path": statistics_path}), settings)
        log(f"decomposition: {decomposition['fallbacks']}/{decomposition['adapted_modules']} fall back; "
            f"gram {decomposition['gram_s']:.2f} s, exact {decomposition['exact_s']:.2f} s")
        generation = run_case(Case("generation", "real_perf", "measure_generation", common), settings)
        log(f"generation: backend {generation['backend_median_s']:.1f} s, plain {generation['plain_median_s']:.1f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    calibration_ratio = ratio(med(summary["compute_statistics"], "wall_s"), med(summary["floor"], "wall_s"))
    data = {
        **part_header(PART, settings, machine, started),
        "duration_s": time.time() - started,
        "config": config,
        "runs": runs,
        "summary": summary,
        "calibration_over_floor": calibration_ratio,
        "profile": profile,
        "decomposition": decomposition,
        "generation": generation,
        "targets": [
            target_check("compute_statistics / forward+backward floor", calibration_ratio, 1.15),
            target_check("HF backend throughput / plain generate", generation["throughput_backend_over_plain"],
                         0.9, ">="),
        ],
    }
    write_json(settings, PART, data)
    return data


def markdown(data: dict) -> str:
    """The part's section of SUMMARY.md."""

    config, summary = data["config"], data["summary"]
    floor, calibration = summary["floor"], summary["compute_statistics"]
    first = data["runs"]["floor"][0]
    lines = [
        "## Real shapes: SmolLM2-135M-Instruct (210 target projections)" if config["model"] == "smollm2"
        else "## Real shapes (tiny Llama stand-in)",
        "",
        f"(a) Calibration on {first['num_samples']} MATH training rows ({config['num_batches']} batches of "
        f"{config['batch_size']}, {first['num_tokens']} tokens, cut-off {config['cutoff_len']}), r = {config['r']}; "
        f"medians of {len(data['runs']['floor'])} interleaved fresh processes [min–max].",
        "",
        markdown_table(
            ["case", "wall s", "peak above start MiB"],
            [["forward+backward floor (grads on target weights only)",
              f"{med(floor, 'wall_s'):.2f} [{floor['wall_s']['min']:.2f}–{floor['wall_s']['max']:.2f}]",
              med(floor, "peak_above_start_mib")],
             ["tlora.compute_statistics",
              f"{med(calibration, 'wall_s'):.2f} [{calibration['wall_s']['min']:.2f}–{calibration['wall_s']['max']:.2f}]",
              med(calibration, "peak_above_start_mib")],
             ["ratio", fmt(data["calibration_over_floor"]), ""]]),
        "",
        "Where the extra time goes (one profiled run of each, torch.profiler operator self time; profiling inflates "
        "both):",
        "",
        markdown_table(["group", "floor s", "compute_statistics s", "extra s"],
                       [[group, data["profile"]["floor"]["groups_s"].get(group, 0.0),
                         data["profile"]["calibration"]["groups_s"][group], extra]
                        for group, extra in data["profile"]["extra_s"].items()]
                       + [["wall", data["profile"]["floor"]["wall_s"], data["profile"]["calibration"]["wall_s"],
                           data["profile"]["extra_total_s"]]]),
        "",
    ]
    d = data["decomposition"]
    lines += [
        f"(b) Decomposition of the {d['adapted_modules']} adapted modules: `gram` {d['gram_s']:.2f} s, `exact` "
        f"{d['exact_s']:.2f} s (gram / exact {fmt(d['gram_over_exact'])}); {d['fallbacks']} modules "
        f"({d['fallback_share'] * 100:.0f} %) exceed the Gram bound's tolerance {d['tolerance']:g} and fall back to "
        f"the exact SVD (bound median {fmt(d['bound_median'])}, largest finite {fmt(d['bound_max_finite'])}, "
        f"{d['bound_infinite']} with no gap). Gram without the fallback: projector distance to the exact subspace "
        f"max {fmt(d['distance_gram_without_fallback_max'])}, mean {fmt(d['distance_gram_without_fallback_mean'])}. "
        f"A tolerance at the float32 statistics' own precision (eps32 = {d['proposed_tolerance']:.1e}) would send "
        f"{d['fallbacks_at_proposed_tolerance']} modules to the fallback.",
        "",
    ]
    g = data["generation"]
    lines += [
        f"(c) Generation, {g['prompts']} GSM8K prompts, batch {g['batch_size']}, {g['max_new_tokens']} new tokens: "
        f"HF backend {g['backend_median_s']:.2f} s, plain `model.generate` {g['plain_median_s']:.2f} s (means of 2, "
        f"A B B A after an untimed warm-up pass of {g.get('warm_up_s', float('nan')):.2f} s); throughput ratio "
        f"{fmt(g['throughput_backend_over_plain'])}; identical completions "
        f"{g['same_completions']}/{g['prompts']}.",
        "",
    ]
    lines += targets_markdown(data["targets"])
    return "\n".join(lines)
