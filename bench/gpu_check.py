"""What the CPU tests cannot check, on a machine with a GPU (run through bench/gpu_check.sh, under 10 minutes):

* bf16 and fp16 calibration on CUDA: statistics finite and close to a float32 CPU reference (tiny Llama);
* a padded batch on a model split over two devices (two GPUs when present, else GPU + CPU): the same statistics;
* a bitsandbytes 4-bit base on CUDA: statistics equal those of the float model with the dequantised weights, and
  B trains through PEFT's 4-bit LoRA layers;
* a short DeepSpeed (ZeRO-2) TLoRA run of math_train.py, and the clear refusal of ZeRO-3.

Prints a PASS/FAIL/SKIP table and writes JSON to $OUT/gpu_check.json (else bench/results/gpu_check.json). Without
CUDA it prints why and exits 0, unless --device cpu is given, which runs the same checks on the CPU (for the tests).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Largest relative error of the statistics of a half-precision model against the float32 reference.
TOLERANCES = {"bfloat16": 0.08, "float16": 0.02, "float32": 1e-4}


@dataclass
class CheckResult:
    """One row of the table."""

    name: str
    status: str  # PASS, FAIL or SKIP
    seconds: float = 0.0
    details: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------------------------


def tiny_model(dtype: torch.dtype = torch.float32):
    """The tiny Llama every check uses (widths multiples of 64, as bitsandbytes' 4-bit blocks need)."""
    from tlora.fixtures.toy import tiny_llama

    return tiny_llama(hidden_size=64, num_layers=2, intermediate_size=128, num_heads=4, seed=0, dtype=dtype)


def padded_batches(batch_size: int = 4, num_samples: int = 8, seed: int = 0) -> list[dict]:
    """Right-padded causal-LM batches of random tokens, prompts masked in the labels, lengths 9 to 24."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for start in range(0, num_samples, batch_size):
        lengths = torch.randint(9, 25, (batch_size,), generator=generator).tolist()
        width = max(lengths)
        input_ids = torch.zeros(batch_size, width, dtype=torch.long)
        mask = torch.zeros(batch_size, width, dtype=torch.long)
        labels = torch.full((batch_size, width), -100, dtype=torch.long)
        for row, length in enumerate(lengths):
            tokens = torch.randint(3, 260, (length,), generator=generator)
            input_ids[row, :length], mask[row, :length] = tokens, 1
            labels[row, length // 2 : length] = tokens[length // 2 :]
        batches.append({"input_ids": input_ids, "attention_mask": mask, "labels": labels})
    return batches


def statistics_of(model, batches, **config_overrides):
    """TLoRA's calibration statistics of `model` (float32 sums)."""
    from tlora import TLoRAConfig, compute_statistics

    config = TLoRAConfig(r=4, lora_alpha=8, target_modules=TARGETS, **config_overrides)
    return compute_statistics(model, batches, config, show_progress=False)


def compare_statistics(reference, other) -> dict:
    """Largest relative Frobenius error of the covariances / W C products and of the sensitivities, and whether
    every statistic of `other` is finite."""
    def relative(a: torch.Tensor, b: torch.Tensor) -> float:
        a, b = a.double().cpu(), b.double().cpu()
        return float(torch.linalg.norm(a - b) / torch.linalg.norm(b).clamp_min(1e-30))

    matrices = [
        relative(other.covariances[key], value) for key, value in reference.covariances.items()
    ] + [relative(other.cross_covariances[key], value) for key, value in reference.cross_covariances.items()]
    sensitivities = [
        abs(other.sensitivity(name) - value) / max(abs(value), 1e-30) for name, value in reference.sensitivities().items()
    ]
    tensors = list(other.covariances.values()) + list(other.cross_covariances.values())
    finite = all(bool(torch.isfinite(t).all()) for t in tensors) and all(
        torch.isfinite(torch.tensor(v)) for v in other.sensitivities().values()
    )
    return {
        "max_matrix_error": max(matrices, default=0.0),
        "max_sensitivity_error": max(sensitivities, default=0.0),
        "finite": bool(finite),
    }


def _timed(name: str, function: Callable[[], CheckResult]) -> CheckResult:
    """Run one check; an exception is a FAIL with its message."""
    started = time.perf_counter()
    try:
        result = function()
    except Exception as error:  # a failing check must not hide the others
        result = CheckResult(name, "FAIL", details={"error": f"{type(error).__name__}: {error}",
                                                   "traceback": traceback.format_exc(limit=4)})
    result.seconds = round(time.perf_counter() - started, 2)
    return result


# ---------------------------------------------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------------------------------------------


def check_precision(dtype_name: str, device: str) -> CheckResult:
    """Calibration of a `dtype_name` model on `device` against the float32 CPU reference."""
    name = f"calibration {dtype_name} on {device}"
    batches = padded_batches()
    reference = statistics_of(tiny_model(), batches)
    model = tiny_model(getattr(torch, dtype_name)).to(device)
    errors = compare_statistics(reference, statistics_of(model, batches))
    tolerance = TOLERANCES[dtype_name]
    ok = errors["finite"] and errors["max_matrix_error"] <= tolerance and errors["max_sensitivity_error"] <= 2 * tolerance
    return CheckResult(name, "PASS" if ok else "FAIL", details={**errors, "tolerance": tolerance})


def split_device_map(model, devices: list[str]) -> dict[str, str]:
    """An accelerate device map that puts the first half of the decoder layers (and the embeddings) on devices[0],
    the rest (with the final norm and the head) on devices[1]."""
    layers = len(model.model.layers)
    device_map = {"model.embed_tokens": devices[0], "model.rotary_emb": devices[0]}
    for index in range(layers):
        device_map[f"model.layers.{index}"] = devices[0] if index < (layers + 1) // 2 else devices[1]
    device_map.update({"model.norm": devices[1], "lm_head": devices[1]})
    return device_map


def check_split(devices: list[str]) -> CheckResult:
    """A padded batch on a model dispatched over two devices gives the single-device statistics."""
    from accelerate import dispatch_model

    name = f"padded batch split over {' + '.join(devices)}"
    batches = padded_batches()
    reference = statistics_of(tiny_model(), batches)
    model = dispatch_model(tiny_model(), device_map=split_device_map(tiny_model(), devices))
    placed = {str(next(layer.parameters()).device) for layer in model.model.layers}
    errors = compare_statistics(reference, statistics_of(model, batches))
    ok = errors["finite"] and errors["max_matrix_error"] <= 1e-4 and errors["max_sensitivity_error"] <= 1e-4
    return CheckResult(name, "PASS" if ok else "FAIL", details={**errors, "layer_devices": sorted(placed)})


def check_4bit(device: str, workdir: Path) -> CheckResult:
    """4-bit NF4 base on `device`: statistics of the dequantised float twin; B trains; the loss is finite."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from tlora import TLoRAConfig, find_target_modules, get_tlora_model

    name = f"bitsandbytes 4-bit on {device}"
    path = workdir / "tiny-llama"
    tiny_model().save_pretrained(path)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    quantized = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=quantization, dtype=torch.float32, device_map={"": device}
    )
    twin = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    config = TLoRAConfig(target_modules=TARGETS)
    floats = {t.name: t for t in find_target_modules(twin, config)}
    with torch.no_grad():
        for target in find_target_modules(quantized, config):
            floats[target.name].module.weight.copy_(target.weight_matrix(torch.float32))
    batches = padded_batches()
    errors = compare_statistics(statistics_of(twin, batches), statistics_of(quantized, batches))
    model = get_tlora_model(quantized, TLoRAConfig(r=4, lora_alpha=8, target_modules=TARGETS), batches, show_progress=False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for batch in batches * 2:
        loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    trained = max(float(p.detach().abs().max()) for n, p in model.named_parameters() if "lora_B" in n)
    ok = errors["finite"] and errors["max_matrix_error"] <= 1e-4 and trained > 0 and all(map(torch.isfinite, torch.tensor(losses)))
    return CheckResult(name, "PASS" if ok else "FAIL", details={**errors, "losses": losses, "max_abs_B": trained})


def deepspeed_command(model_dir: Path, output_dir: Path, config: Path, *extra: str) -> list[str]:
    """`deepspeed --num_gpus 1 math_train.py` for a 3-step TLoRA run on the shipped math sample."""
    return [
        sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", str(free_port()),
        str(REPO_ROOT / "math_train.py"),
        "--deepspeed", str(config), "--base_model", str(model_dir),
        "--data_path", str(REPO_ROOT / "peft" / "src" / "tlora" / "data" / "sample_math.jsonl"),
        "--method", "tlora", "--lora_r", "4", "--lora_alpha", "8", "--calibration_samples", "8",
        "--calibration_batch_size", "4", "--global_batch_size", "4", "--per_device_train_batch_size", "4",
        "--max_steps", "3", "--save_strategy", "no", "--disable_tqdm", "true",
        "--output_dir", str(output_dir), *extra,
    ]


def free_port() -> int:
    """A TCP port nobody listens on right now (the launcher's rendezvous)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_deepspeed(device: str, workdir: Path, timeout: int = 240) -> CheckResult:
    """ZeRO-2: a 3-step TLoRA run finishes (bf16 on CUDA); ZeRO-3: refused with the message that says to use ZeRO-2."""
    from tlora.fixtures.toy_model import write_toy_model

    precision = ("--bf16",) if device == "cuda" else ()
    model_dir = write_toy_model(workdir / "ds-model")
    details: dict = {}
    zero2 = subprocess.run(
        deepspeed_command(model_dir, workdir / "zero2", REPO_ROOT / "config" / "ds_config_zero2_no_offload.json", *precision),
        capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT,
    )
    record_path = workdir / "zero2" / "run_record.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    details["zero2_status"] = record.get("status", f"exit {zero2.returncode}")
    if details["zero2_status"] != "finished":
        details["zero2_tail"] = (zero2.stdout + zero2.stderr)[-1500:]
    zero3 = subprocess.run(
        deepspeed_command(model_dir, workdir / "zero3", REPO_ROOT / "config" / "ds_config_zero3.json", *precision),
        capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT,
    )
    details["zero3_refused_clearly"] = "partitioned by DeepSpeed ZeRO-3" in (zero3.stdout + zero3.stderr)
    if not details["zero3_refused_clearly"]:
        details["zero3_tail"] = (zero3.stdout + zero3.stderr)[-1500:]
    ok = details["zero2_status"] == "finished" and details["zero3_refused_clearly"]
    return CheckResult("DeepSpeed ZeRO-2 run, ZeRO-3 refusal", "PASS" if ok else "FAIL", details=details)


# ---------------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------------


def split_devices(device: str) -> list[str]:
    """Two CUDA devices when present, else the GPU and the CPU; on the CPU (tests), the CPU twice."""
    if device == "cpu":
        return ["cpu", "cpu"]
    return ["cuda:0", "cuda:1"] if torch.cuda.device_count() > 1 else ["cuda:0", "cpu"]


def run_checks(device: str, workdir: Path, skip: set[str] = frozenset()) -> list[CheckResult]:
    """All checks on `device` ("cuda" or, for the tests, "cpu"); names in `skip` are reported as SKIP."""
    checks: list[tuple[str, Callable[[], CheckResult]]] = [
        ("bf16", lambda: check_precision("bfloat16", device)),
        ("fp16", lambda: check_precision("float16", device)),
        ("split", lambda: check_split(split_devices(device))),
        ("4bit", lambda: check_4bit(device, workdir)),
        ("deepspeed", lambda: check_deepspeed(device, workdir)),
    ]
    results = []
    for key, function in checks:
        if key in skip:
            results.append(CheckResult(key, "SKIP", details={"reason": "--skip"}))
            continue
        results.append(_timed(key, function))
    return results


def format_table(results: list[CheckResult]) -> str:
    """The PASS/FAIL table, one row per check with its key numbers."""
    lines = [f"{'check':<42} {'status':<6} {'seconds':>8}  details", "-" * 100]
    for result in results:
        shown = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in result.details.items()
                 if k not in ("traceback", "zero2_tail", "zero3_tail", "losses")}
        lines.append(f"{result.name:<42} {result.status:<6} {result.seconds:>8.2f}  {json.dumps(shown)[:160]}")
    return "\n".join(lines)


def results_path() -> Path:
    """$OUT/gpu_check.json when $OUT is set, else bench/results/gpu_check.json."""
    folder = Path(os.environ["OUT"]) if os.environ.get("OUT") else REPO_ROOT / "bench" / "results"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / "gpu_check.json"


def main(argv: Optional[list[str]] = None) -> int:
    """Run the checks, print the table, write the JSON; exit 1 if any check failed, 0 without CUDA."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: run the logic on the CPU")
    parser.add_argument("--skip", default="", help="comma-separated checks to skip: bf16,fp16,split,4bit,deepspeed")
    options = parser.parse_args(argv)
    if options.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible; nothing to check here (the CPU tests cover the rest). SKIPPED.")
        return 0
    sys.path.insert(0, str(REPO_ROOT / "peft" / "src"))
    skip = {name.strip() for name in options.skip.split(",") if name.strip()}
    with tempfile.TemporaryDirectory(prefix="tlora-gpu-check-") as workdir:
        results = run_checks(options.device, Path(workdir), skip)
    print(format_table(results))
    device_name = torch.cuda.get_device_name(0) if options.device == "cuda" else "cpu"
    payload = {"device": device_name, "torch": torch.__version__, "results": [asdict(r) for r in results]}
    path = results_path()
    path.write_text(json.dumps(payload, indent=2))
    print(f"wrote {path}")
    return 1 if any(r.status == "FAIL" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
