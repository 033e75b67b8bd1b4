"""Run a calibration on two CPU ranks (gloo) started as two plain processes, and read what each rank raised."""

import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap
import time

HERE = pathlib.Path(__file__).resolve().parent

PROLOGUE = """
import datetime, json, sys, time
import torch, torch.distributed as dist
sys.path.insert(0, {here!r})
from conftest import LLAMA_TARGETS, make_samples, pad_batches
from tlora import TLoRAConfig, compute_statistics, get_tlora_model
from tlora.toy import byte_tokenizer, tiny_llama

dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=90))
rank = dist.get_rank()
model = tiny_llama(hidden_size=32, num_layers=2, intermediate_size=48, num_heads=4, seed=0)
batches = pad_batches(make_samples(byte_tokenizer()), 2)
config = TLoRAConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, task_type="CAUSAL_LM")
"""

EPILOGUE = """
start = time.monotonic()
try:
    calibrate()
    outcome = {"error": None}
except Exception as error:
    outcome = {"error": type(error).__name__, "message": str(error)}
outcome["seconds"] = time.monotonic() - start
with open(sys.argv[1] + f"/rank{rank}.json", "w") as handle:
    json.dump(outcome, handle)
"""


def run_two_ranks(body: str, folder: pathlib.Path, timeout: float = 150) -> list[dict]:
    """Run `body` (which defines `calibrate()`; `model`, `batches`, `config`, `rank` are set) on ranks 0 and 1;
    returns per rank {"error": class name or None, "message", "seconds" the call took}."""
    script = folder / "worker.py"
    script.write_text(PROLOGUE.format(here=str(HERE)) + textwrap.dedent(body) + EPILOGUE)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    processes = []
    for rank in (0, 1):
        env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank),
                   WORLD_SIZE="2", LOCAL_RANK=str(rank))
        processes.append(subprocess.Popen([sys.executable, str(script), str(folder)], env=env, cwd=folder))
    deadline = time.monotonic() + timeout
    for process in processes:
        process.wait(timeout=max(1, deadline - time.monotonic()))
    return [json.loads((folder / f"rank{rank}.json").read_text()) for rank in (0, 1)]
