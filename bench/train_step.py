"""Part 3 — training step: time per optimiser step and peak memory of LoRA (A and B trained), LoRA with A frozen,
TLoRA at the same nominal r (B only, allocated ranks), DoRA and full fine-tuning, on the same batch with AdamW, as
ratios to LoRA. Every method is built by the training core's method registry; each case runs in a fresh process.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from typing import Any, Callable

from common import (
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
    median,
    paired_ratio,
    part_header,
    random_examples,
    random_llama,
    ratio,
    reset_peak_memory,
    run_case,
    run_interleaved,
    summarise_runs,
    synchronize,
    target_check,
    targets_markdown,
    write_json,
)

PART = "train_step"
METHODS = ("lora", "lora_frozen_A", "tlora", "dora", "full")
LEARNING_RATE = 1e-4


def sizes(scale: str) -> dict[str, Any]:
    """Model, batch, rank and step counts (the issue's: the part-1 Llama, batch 4 x 256, r = 32)."""
    if scale == "tiny":
        model = LlamaSize(hidden_size=32, num_layers=1, intermediate_size=64, num_heads=2, vocab_size=64)
        return {"model": model.__dict__, "batch_size": 2, "seq_len": 8, "r": 2, "warmup_steps": 1, "steps": 1,
                "calibration_samples": 2, "calibration_batch_size": 2}
    if scale == "quick":
        model = LlamaSize(hidden_size=128, num_layers=2, intermediate_size=344, num_heads=4, vocab_size=1000)
        return {"model": model.__dict__, "batch_size": 2, "seq_len": 64, "r": 8, "warmup_steps": 1, "steps": 2,
                "calibration_samples": 4, "calibration_batch_size": 2}
    return {"model": LlamaSize().__dict__, "batch_size": 4, "seq_len": 256, "r": 32, "warmup_steps": 2, "steps": 6,
            "calibration_samples": 16, "calibration_batch_size": 8}


def _build(method: str, model: dict, r: int, device: str, tlora_dir: str, calibration, resume: bool):
    """The model to train for `method`, built through the training core's method registry."""
    from tlora.training.registry import build_method

    llama = random_llama(model, device=device, seed=0)
    core_method = "lora" if method == "lora_frozen_A" else method
    context = method_context(llama, core_method, r, 8, calibration, tlora_dir, device)
    context.resume = resume
    built = build_method(context)
    if method == "lora_frozen_A":
        for name, parameter in built.model.named_parameters():
            if "lora_A" in name:
                parameter.requires_grad_(False)
    return built


def prepare_tlora(model: dict, device: str, r: int, calibration_samples: int, calibration_batch_size: int,
                  seq_len: int, output_dir: str, **_: Any) -> dict:
    """Calibrate TLoRA once (training core's build_tlora), leaving tlora_plan.json and the initial A in output_dir."""
    calibration = calibration_set(random_examples(calibration_samples, seq_len, model["vocab_size"], seed=1))
    from tlora.training.registry import build_method

    llama = random_llama(model, device=device, seed=0)
    context = method_context(llama, "tlora", r, calibration_batch_size, calibration, output_dir, device,
                             num_samples=calibration_samples, is_main_process=True)
    built = build_method(context)
    plan = built.plan
    adapter_flops = sum(m.rank * (m.in_features + m.out_features) for m in plan.modules)
    lora_flops = sum(plan.r * (m.in_features + m.out_features) for m in plan.modules)
    return {"calibration_s": built.calibration_seconds, "total_rank": built.plan.total_rank,
            "adapter_flops_over_lora": adapter_flops / lora_flops,
            "plan_trainable_parameters": built.plan.trainable_parameters,
            "lora_trainable_parameters": built.plan.lora_trainable_parameters,
            "dropped_modules": len(built.plan.dropped_modules)}


def measure_steps(method: str, model: dict, batch_size: int, seq_len: int, r: int, warmup_steps: int, steps: int,
                  device: str, tlora_dir: str, **_: Any) -> dict:
    """Median wall time of an AdamW step (forward, backward, step, zero_grad) after warm-up, and peak memory."""
    import torch

    calibration = calibration_set(random_examples(batch_size, seq_len, model["vocab_size"], seed=2))
    built = _build(method, model, r, device, tlora_dir, calibration, resume=(method == "tlora"))
    network = built.model
    network.train()
    trainable = [p for p in network.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATE)
    batch = {k: v.to(device) for k, v in next(iter(calibration.loader(batch_size))).items()}
    record: dict[str, Any] = {"method": method, "trainable_parameters": sum(p.numel() for p in trainable)}
    rss = current_rss_mib()
    reset_peak_memory(device)
    times = []
    for _step in range(warmup_steps + steps):
        synchronize(device)
        start = time.perf_counter()
        loss = network(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        times.append(time.perf_counter() - start)
    measured = times[warmup_steps:]
    record["step_s"] = median(measured)
    record["step_times_s"] = measured
    record["warmup_step_times_s"] = times[:warmup_steps]
    record["final_loss"] = float(loss.detach())
    record.update(memory_record(device, rss))
    return record


# ---------------------------------------------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------------------------------------------


def run(settings: Settings, log: Callable[[str], None] = print) -> dict:
    """Run part 3 and write bench/results/train_step.json."""
    started = time.time()
    machine = machine_info(settings.device)
    config = sizes(settings.scale)
    tlora_dir = tempfile.mkdtemp(prefix="tlora-bench-train-")
    try:
        common = {"model": config["model"], "device": settings.device, "r": config["r"], "tlora_dir": tlora_dir}
        log("train_step: calibrating TLoRA once for its plan")
        preparation = run_case(Case("prepare_tlora", PART, "prepare_tlora",
                                    {**common, "calibration_samples": config["calibration_samples"],
                                     "calibration_batch_size": config["calibration_batch_size"],
                                     "seq_len": config["seq_len"], "output_dir": tlora_dir}), settings)
        step_args = {key: config[key] for key in ("batch_size", "seq_len", "warmup_steps", "steps")}
        cases = [Case(method, PART, "measure_steps", {**common, **step_args, "method": method}) for method in METHODS]
        log(f"train_step: {len(cases)} cases x {settings.repeats} repeats on {settings.device}")
        runs = run_interleaved(cases, settings, progress=log)
    finally:
        shutil.rmtree(tlora_dir, ignore_errors=True)
    data = part_header(PART, settings, machine, started)
    data["config"] = {**config, "optimizer": f"AdamW(lr={LEARNING_RATE})", "methods": list(METHODS)}
    data["tlora_plan"] = preparation
    data["runs"] = runs
    data["summary"] = {name: summarise_runs(case_runs) for name, case_runs in runs.items()}
    data["ratios_to_lora"] = {
        name: {
            "step_time": ratio(med(summary, "step_s"), med(data["summary"]["lora"], "step_s")),
            "step_time_paired": paired_ratio(runs[name], runs["lora"], "step_s", "step_s"),
            "peak_rss": ratio(med(summary, "peak_rss_mib"), med(data["summary"]["lora"], "peak_rss_mib")),
            "training_memory": ratio(med(summary, "peak_above_start_mib"),
                                     med(data["summary"]["lora"], "peak_above_start_mib")),
            "peak_accelerator": ratio(med(summary, "peak_accelerator_mib"),
                                      med(data["summary"]["lora"], "peak_accelerator_mib")),
            "trainable_parameters": ratio(med(summary, "trainable_parameters"),
                                          med(data["summary"]["lora"], "trainable_parameters")),
        }
        for name, summary in data["summary"].items()
    }
    memory_key = "peak_accelerator" if settings.device.startswith("cuda") else "peak_rss"
    data["targets"] = [
        target_check("TLoRA step time / LoRA step time", data["ratios_to_lora"]["tlora"]["step_time"], 0.95),
        target_check(f"TLoRA {memory_key.replace('_', ' ')} / LoRA", data["ratios_to_lora"]["tlora"][memory_key], 1.0, "<"),
    ]
    data["duration_s"] = time.time() - started
    write_json(settings, PART, data)
    return data


LABELS = {
    "lora": "LoRA (A and B trained)",
    "lora_frozen_A": "LoRA, A frozen",
    "tlora": "TLoRA (B only, allocated ranks)",
    "dora": "DoRA",
    "full": "full fine-tuning",
}


def markdown(data: dict) -> str:
    """The part's section of SUMMARY.md."""

    config, summary, ratios = data["config"], data["summary"], data["ratios_to_lora"]
    model = config["model"]
    lines = [
        "## 3. Training step",
        "",
        f"Random Llama (hidden {model['hidden_size']}, {model['num_layers']} layers), batch {config['batch_size']} x "
        f"{config['seq_len']} tokens, {config['optimizer']}, r = alpha = {config['r']}; median of {config['steps']} "
        f"steps after {config['warmup_steps']} warm-up steps, per process; medians over "
        f"{data['settings']['repeats']} interleaved processes. TLoRA's plan: total rank "
        f"{data['tlora_plan']['total_rank']}, {data['tlora_plan']['dropped_modules']} modules dropped "
        f"(calibrated on {config['calibration_samples']} sequences); its adapter matmuls cost "
        f"{data['tlora_plan'].get('adapter_flops_over_lora', float('nan')):.2f}x LoRA's (sum of r_l (m_l + n_l) "
        "over sum of r (m_l + n_l)).",
        "",
    ]
    rows = []
    for name in summary:
        case = summary[name]
        entry = summary[name].get("step_s")
        rows.append([LABELS.get(name, name),
                     f"{entry['median']:.3f} [{entry['min']:.3f}–{entry['max']:.3f}]" if entry else "—",
                     fmt(ratios[name]["step_time"]), fmt(med(case, "peak_rss_mib"), 0), fmt(ratios[name]["peak_rss"]),
                     fmt(med(case, "peak_above_start_mib"), 0), fmt(ratios[name]["training_memory"]),
                     fmt(med(case, "peak_accelerator_mib"), 0), fmt(med(case, "trainable_parameters")),
                     fmt(ratios[name]["trainable_parameters"])])
    lines += [markdown_table(["method", "step s", "/ LoRA", "peak RSS MiB", "/ LoRA", "peak above built model MiB",
                              "/ LoRA", "peak GPU MiB", "trainable params", "/ LoRA"], rows), "",
              "Peak RSS is the whole process (libraries, model, activations, gradients, optimiser state); the column "
              "after it counts only what the training steps added to the built model.", ""]
    lines += targets_markdown(data["targets"])
    return "\n".join(lines)
