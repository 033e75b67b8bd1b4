"""Calibration time against its floor on SmolLM2-135M-Instruct: `tlora.compute_statistics` (default
`TLoRAConfig(r=8)`, all seven projections) versus forward+backward passes with gradients on the 210 target weights
only, over the same 2 padded batches x 8 samples of <= 192 tokens (labels on the response part). Two more cases
time only what TLoRA's arithmetic adds to the floor's work — the covariance / `W C` products (same shapes and calls,
random rows) and the per-sample reductions sum |W * G_s| (on cold buffers: an upper bound of their cost inside the
pass). One profiled call of the floor and of compute_statistics then says where the time beyond the floor goes (the
method's own arithmetic, padded-row gathers, copies, hooks). A last case times sensitivity="batch", and the script
reports how far that cheaper mode moves the allocated ranks from the method's per-sample definition.

Cases run interleaved in one process (floor, tlora, [baseline], then reversed, ...) and the table shows medians.
`--baseline-src DIR` also times another copy of the package (e.g. `git archive <commit> peft/src/tlora | tar -x -C
/tmp/base` then `--baseline-src /tmp/base/peft/src/tlora`), loaded under the name `tlora_baseline`, so before/after
ratios come from the same run. `--tiny` uses a tiny random Llama instead (smoke mode, numbers not meaningful).

    python bench/calibration_speed.py [--repeats 3] [--tiny] [--baseline-src DIR] [--profile]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Callable, Optional

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "calibration_speed.json"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load_model(tiny: bool) -> torch.nn.Module:
    """SmolLM2-135M-Instruct in float32 (or a tiny random Llama), in eval mode."""
    if tiny:
        from tlora.fixtures.toy import tiny_llama

        model = tiny_llama(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_key_value_heads=2)
    else:
        from transformers import AutoModelForCausalLM

        from tlora.demo.pretrained import smollm2_path

        model = AutoModelForCausalLM.from_pretrained(str(smollm2_path()), torch_dtype=torch.float32)
    return model.eval()


def make_batches(vocab_size: int, num_batches: int, batch_size: int, max_length: int, seed: int = 0) -> list[dict]:
    """Right-padded batches of random tokens with lengths in [max_length/2, max_length]; labels on the last ~60%."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num_batches):
        lengths = torch.randint(max_length // 2, max_length + 1, (batch_size,), generator=generator)
        length = int(lengths.max())
        input_ids = torch.zeros(batch_size, length, dtype=torch.long)
        attention_mask = torch.zeros(batch_size, length, dtype=torch.long)
        labels = torch.full((batch_size, length), -100, dtype=torch.long)
        for row, sample_length in enumerate(lengths.tolist()):
            tokens = torch.randint(3, vocab_size, (sample_length,), generator=generator)
            prompt = int(sample_length * 0.4)
            input_ids[row, :sample_length] = tokens
            attention_mask[row, :sample_length] = 1
            labels[row, prompt:sample_length] = tokens[prompt:]
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})
    return batches


def floor_pass(model: torch.nn.Module, batches: list[dict]) -> None:
    """Forward+backward over the batches with gradients on the target weights only (the model's batch loss)."""
    targets = [m.weight for n, m in model.named_modules() if n.split(".")[-1] in TARGETS]
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for weight in targets:
        weight.requires_grad_(True)
    try:
        for batch in batches:
            model(**batch, use_cache=False).loss.backward()
            for weight in targets:
                weight.grad = None
    finally:
        for weight in targets:
            weight.requires_grad_(False)


def load_package_copy(source: Path, name: str = "tlora_baseline") -> ModuleType:
    """Import the package folder `source` (a copy of peft/src/tlora) under `name`."""
    spec = importlib.util.spec_from_file_location(name, source / "__init__.py", submodule_search_locations=[str(source)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def calibration_pass(package: ModuleType, **options) -> Callable[[torch.nn.Module, list[dict]], object]:
    """compute_statistics of `package` with TLoRAConfig(r=8, **options) on the seven projections."""

    def run(model: torch.nn.Module, batches: list[dict]) -> object:
        config = package.TLoRAConfig(r=8, target_modules=TARGETS, **options)
        return package.compute_statistics(model, batches, config, show_progress=False)

    return run


def plan_agreement(model: torch.nn.Module, batches: list[dict]) -> dict:
    """How far the cheaper sensitivity="batch" moves TLoRA's allocation from the method's per-sample definition on
    the same batches: the modules whose rank differs, the largest rank difference and the largest relative
    difference of the normalised sensitivities."""
    from tlora import TLoRAConfig, compute_statistics
    from tlora.pipeline import plan_from_statistics

    plans, shares = {}, {}
    for mode in ("per_sample", "batch"):
        config = TLoRAConfig(r=8, target_modules=TARGETS, sensitivity=mode)
        statistics_ = compute_statistics(model, batches, config, show_progress=False)
        plans[mode] = {m.name: m.rank for m in plan_from_statistics(statistics_, config).modules}
        values = statistics_.sensitivities()
        total = sum(values.values())
        shares[mode] = {name: value / total for name, value in values.items()}
    names = sorted(plans["per_sample"])
    differences = [abs(plans["per_sample"][n] - plans["batch"][n]) for n in names]
    return {
        "modules": len(names),
        "modules_with_another_rank": sum(d > 0 for d in differences),
        "largest_rank_difference": max(differences),
        "largest_relative_sensitivity_share_difference": max(
            abs(shares["batch"][n] - shares["per_sample"][n]) / shares["per_sample"][n] for n in names),
    }


def statistics_products() -> Callable[[torch.nn.Module, list[dict]], object]:
    """Only the products that TLoRA adds to the floor's work: for every batch, each shared covariance (upper blocks)
    and each `W C` cross product of the layout `compute_statistics` chooses, over random rows as many as the batch's
    valid tokens (the same shapes and `StatisticSums` calls as during calibration; no forward, no backward)."""
    from tlora import TLoRAConfig
    from tlora.calibration.layout import probe_layout
    from tlora.calibration.hooks import StatisticSums
    from tlora.targets import find_target_modules

    prepared: dict = {}

    def run(model: torch.nn.Module, batches: list[dict]) -> object:
        if not prepared:
            targets = find_target_modules(model, TLoRAConfig(r=8, target_modules=TARGETS))
            layout = probe_layout(model, targets, batches[0])
            widest = max(max(t.in_features, t.out_features) for t in targets)
            prepared["work"] = []
            for target in targets:
                kind, key = layout[target.name]
                if kind == "cross" or key == target.name:  # a shared covariance is formed by its first reader only
                    prepared["work"].append((kind, key, target.in_features, target.out_features))
            prepared["rows"] = [torch.randn(int(b["attention_mask"].sum()), widest) for b in batches]
        sums = StatisticSums(torch.float32, None)
        for rows in prepared["rows"]:
            for kind, key, n_in, n_out in prepared["work"]:
                if kind == "covariance":
                    sums.add_gram(sums.buffer(sums.covariances, key, (n_in, n_in), rows.device), rows[:, :n_in])
                else:
                    buffer = sums.buffer(sums.cross, key, (n_out, n_in), rows.device)
                    sums.add_product(buffer, rows[:, :n_out], rows[:, :n_in])
        return sums

    return run


def sensitivity_reductions() -> Callable[[torch.nn.Module, list[dict]], object]:
    """Only the per-sample reductions TLoRA adds to the floor's work: for every batch, sample and target, g = sum
    |W * G_s| over an m x n gradient buffer (mul_, abs_, sum as `sensitivity._mean_weighted_l1` does). The per-sample
    products G_s = delta_s^T X_s themselves are not timed: together they are the floor's batch weight gradient."""
    from tlora import TLoRAConfig
    from tlora.calibration.sensitivity import _mean_weighted_l1
    from tlora.targets import find_target_modules

    prepared: dict = {}

    def run(model: torch.nn.Module, batches: list[dict]) -> object:
        if not prepared:
            targets = find_target_modules(model, TLoRAConfig(r=8, target_modules=TARGETS))
            prepared["weights"] = [t.weight_matrix(torch.float32, copy=False) for t in targets]
            prepared["buffers"] = [torch.randn(w.shape) for w in prepared["weights"]]
        total = 0.0
        for batch in batches:
            for _sample in range(batch["input_ids"].shape[0]):
                for weight, buffer in zip(prepared["weights"], prepared["buffers"]):
                    total += float(_mean_weighted_l1(buffer, weight))  # overwrites the buffer, as in calibration
        return total

    return run


def timed(function: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    start, cpu = time.perf_counter(), time.process_time()
    function()
    return time.perf_counter() - start, time.process_time() - cpu


def measure(cases: dict[str, Callable], model: torch.nn.Module, batches: list[dict], repeats: int) -> dict:
    """Interleaved repetitions (A B C, C B A, ...) after one warm-up of each case; (wall, CPU) seconds per case."""
    for run in cases.values():
        run(model, batches)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    order = list(cases)
    for repeat in range(repeats):
        for name in order if repeat % 2 == 0 else reversed(order):
            times[name].append(timed(lambda: cases[name](model, batches)))
    return times


def profile_case(run: Callable, model: torch.nn.Module, batches: list[dict], rows: int = 25) -> str:
    """torch.profiler table (self CPU time) of one call."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run(model, batches)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


# Operators of compute_statistics' profile, grouped by what they do beyond the floor's work.
PROFILE_GROUPS = {
    "covariance / W C products": ("aten::addmm_",),
    "per-sample |W * G_s| reductions": ("aten::mul_", "aten::abs", "aten::abs_", "aten::sum"),
    "padded-row gathers": ("aten::index_select", "aten::index"),
    "copies and fills": ("aten::copy_", "aten::fill_", "aten::zero_"),
    "per-sample gradient products against the batched ones": ("aten::mm",),
}
METHOD_ARITHMETIC = ("covariance / W C products", "per-sample |W * G_s| reductions")


def self_cpu_by_operator(run: Callable, model: torch.nn.Module, batches: list[dict]) -> dict[str, float]:
    """Self CPU seconds per operator of one call, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run(model, batches)
    return {event.key: event.self_cpu_time_total / 1e6 for event in prof.key_averages()}


def profile_excess(model: torch.nn.Module, batches: list[dict], floor: Callable, calibration: Callable) -> dict:
    """Where compute_statistics' self CPU time beyond the floor's goes (one profiled call of each): seconds per group
    of PROFILE_GROUPS, the rest, and the method's own arithmetic and everything else as fractions of the floor."""
    base, ours = self_cpu_by_operator(floor, model, batches), self_cpu_by_operator(calibration, model, batches)
    floor_total, excess_total = sum(base.values()), sum(ours.values()) - sum(base.values())
    groups = {name: sum(ours.get(op, 0.0) - base.get(op, 0.0) for op in ops) for name, ops in PROFILE_GROUPS.items()}
    groups["everything else (hooks, autograd, loss split)"] = excess_total - sum(groups.values())
    method = sum(groups[name] for name in METHOD_ARITHMETIC)
    return {"floor_self_cpu_s": floor_total, "excess_self_cpu_s": excess_total, "excess_by_group_s": groups,
            "method_arithmetic_over_floor": method / floor_total,
            "other_excess_over_floor": (excess_total - method) / floor_total}


def main(argv: Optional[list[str]] = None) -> dict:
    """Measure, print the table and write bench/results/calibration_speed.json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="tiny random Llama (smoke mode)")
    parser.add_argument("--baseline-src", type=Path, help="another copy of the tlora package to time alongside")
    parser.add_argument("--profile", action="store_true", help="also print a torch.profiler table per case")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    import tlora

    torch.manual_seed(0)
    model = load_model(args.tiny)
    max_length = 32 if args.tiny else 192
    batches = make_batches(model.config.vocab_size, 2, 8 if not args.tiny else 4, max_length)
    cases: dict[str, Callable] = {"floor": floor_pass, "compute_statistics": calibration_pass(tlora),
                                  "compute_statistics, sensitivity='batch'": calibration_pass(tlora, sensitivity="batch")}
    if args.baseline_src:
        cases["baseline compute_statistics"] = calibration_pass(load_package_copy(args.baseline_src.resolve()))
    cases["covariance products only"] = statistics_products()
    cases["per-sample |W*G| reductions only"] = sensitivity_reductions()
    times = measure(cases, model, batches, args.repeats)
    wall = {name: [w for w, _ in values] for name, values in times.items()}
    cpu = {name: [c for _, c in values] for name, values in times.items()}
    medians = {name: statistics.median(values) for name, values in wall.items()}
    cpu_medians = {name: statistics.median(values) for name, values in cpu.items()}
    print(f"{'case':40s} {'wall s':>8s} {'x floor':>8s} {'CPU s':>8s} {'x floor':>8s}  wall, all repeats")
    for name, value in medians.items():
        print(
            f"{name:40s} {value:8.2f} {value / medians['floor']:8.3f} {cpu_medians[name]:8.2f} "
            f"{cpu_medians[name] / cpu_medians['floor']:8.3f}  {[round(t, 2) for t in wall[name]]}"
        )
    if args.profile:
        for name, run in cases.items():
            print(f"\n== {name}\n{profile_case(run, model, batches)}")
    result = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + (argv if argv is not None else sys.argv[1:])),
        "model": "tiny-llama" if args.tiny else "SmolLM2-135M-Instruct",
        "batches": [list(batch["input_ids"].shape) for batch in batches],
        "tokens": int(sum(int(batch["attention_mask"].sum()) for batch in batches)),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "wall_s": wall,
        "cpu_s": cpu,
        "median_wall_s": medians,
        "median_cpu_s": cpu_medians,
        "ratio_to_floor_wall": {name: value / medians["floor"] for name, value in medians.items()},
        "ratio_to_floor_cpu": {name: value / cpu_medians["floor"] for name, value in cpu_medians.items()},
    }
    # Where the time beyond the floor goes, from the profiler (the isolated cases above run on cold buffers and so
    # overstate what the same arithmetic costs inside the pass, where its inputs were just written).
    result["profile_excess"] = excess = profile_excess(model, batches, cases["floor"], cases["compute_statistics"])
    print(f"compute_statistics beyond the floor, self CPU (profiler): {excess['excess_self_cpu_s']:.2f} s of the "
          f"floor's {excess['floor_self_cpu_s']:.2f} s")
    for name, seconds in excess["excess_by_group_s"].items():
        print(f"  {name:55s} {seconds:+7.2f} s  {seconds / excess['floor_self_cpu_s']:+.3f} x floor")
    print(f"the method's own arithmetic: {excess['method_arithmetic_over_floor']:.3f} x floor; everything else: "
          f"{excess['other_excess_over_floor']:+.3f} x floor")
    result["batch_sensitivity_plan"] = plan_agreement(model, batches)
    agreement = result["batch_sensitivity_plan"]
    print(f"sensitivity='batch' against 'per_sample': {agreement['modules_with_another_rank']} of "
          f"{agreement['modules']} modules get another rank (largest difference "
          f"{agreement['largest_rank_difference']}); sensitivity shares differ by up to "
          f"{agreement['largest_relative_sensitivity_share_difference']:.1%}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
