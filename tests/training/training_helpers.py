"""Helpers of the training tests: paths of the shipped samples, tiny-run arguments, and launching the task scripts
through the real DeepSpeed launcher (CPU ranks over gloo on a machine without GPUs)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DATA = REPO_ROOT / "peft" / "src" / "tlora" / "data"
SAMPLE_MATH = PACKAGE_DATA / "sample_math.jsonl"
SAMPLE_COMMONSENSE = PACKAGE_DATA / "sample_commonsense.json"
SAMPLE_NLU = PACKAGE_DATA / "sample_nlu.jsonl"
DS_CONFIG = REPO_ROOT / "config" / "ds_config_zero2_no_offload.json"
LLAMA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def load_task(script: str):
    """The TaskDefaults of a top-level script (math_train.py, ...), imported without running it."""
    spec = importlib.util.spec_from_file_location(script.removesuffix(".py"), REPO_ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TASK


def tiny_run_arguments(model_dir: Path, output_dir: Path, method: str, *extra: str) -> list[str]:
    """Command-line arguments of a few-step CPU run of a generation task on the shipped math sample."""
    return [
        "--base_model", str(model_dir),
        "--data_path", str(SAMPLE_MATH),
        "--method", method,
        "--lora_r", "4",
        "--lora_alpha", "8",
        "--calibration_samples", "8",
        "--calibration_batch_size", "4",
        "--global_batch_size", "4",
        "--per_device_train_batch_size", "4",
        "--max_steps", "2",
        "--learning_rate", "1e-3",
        "--eva_max_passes", "2",
        "--save_strategy", "no",
        "--disable_tqdm", "true",
        "--output_dir", str(output_dir),
        *extra,
    ]


def free_port() -> int:
    """A TCP port nobody listens on right now (for the rendezvous of a launched run)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def deepspeed_command(num_processes: int, script: str, arguments: list[str]) -> list[str]:
    """`deepspeed --num_gpus N --master_port P script ...` (the real launcher; CPU ranks on this machine)."""
    launcher = shutil.which("deepspeed")
    prefix = [launcher] if launcher else [sys.executable, "-m", "deepspeed.launcher.runner"]
    return prefix + ["--num_gpus", str(num_processes), "--master_port", str(free_port()), str(REPO_ROOT / script)] + arguments


def run_command(command: list[str], timeout: int, log: Optional[Path] = None) -> subprocess.CompletedProcess:
    """Run a command from the repository root; fail the test with the tail of its output when it fails."""
    environment = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    result = subprocess.run(
        command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=timeout, check=False
    )
    output = result.stdout + result.stderr
    if log is not None:
        log.write_text(output)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(command[:4])} ... exited with {result.returncode}:\n{output[-6000:]}")
    return result


def report_on_gloo_rank(rank: int, world_size: int, port: int, report: str, action, success: str) -> None:
    """In a two-process gloo group, run `action()` on this rank and write `success`, or the message of the
    RuntimeError it raised, to `<report>.<rank>`."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        try:
            action()
            message = success
        except RuntimeError as error:
            message = str(error)
        Path(report).with_suffix(f".{rank}").write_text(message)
    finally:
        dist.destroy_process_group()
