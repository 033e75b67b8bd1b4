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
import datetime, json, os, sys, time
import torch, torch.distributed as dist
sys.path.insert(0, {here!r})
from conftest import LLAMA_TARGETS, make_samples, pad_batches
from tlora import TLoRAConfig, compute_statistics, get_tlora_model
from tlora.fixtures.toy import byte_tokenizer, tiny_llama

dist.init_process_group("gloo", timeout=datetime.timedelta(seconds={collective_timeout}))
rank = dist.get_rank()
RECORD = {{}}  # the body may note facts here; they join this rank's outcome
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
outcome.update(RECORD)
with open(sys.argv[1] + f"/rank{rank}.json.part", "w") as handle:
    json.dump(outcome, handle)
os.replace(sys.argv[1] + f"/rank{rank}.json.part", sys.argv[1] + f"/rank{rank}.json")
# Stay alive until the other rank is done, like a trainer that logs its error and waits: a rank that returned early
# must not let the other rank's waiting collective fail fast on a closed connection.
while not os.path.exists(sys.argv[1] + f"/rank{1 - rank}.json") and time.monotonic() - start < {stay_alive}:
    time.sleep(0.1)
"""


def run_two_ranks(
    body: str, folder: pathlib.Path, timeout: float = 150, collective_timeout: float = 90
) -> list[dict]:
    """Run `body` (which defines `calibrate()`; `model`, `batches`, `config`, `rank`, `RECORD` are set) on ranks 0
    and 1, with `collective_timeout` seconds for any collective; returns per rank {"error": class name or None,
    "message", "seconds" the call took, and what the body put in RECORD}."""
    script = folder / "worker.py"
    prologue = PROLOGUE.format(here=str(HERE), collective_timeout=collective_timeout)
    script.write_text(prologue + textwrap.dedent(body) + EPILOGUE.replace("{stay_alive}", str(collective_timeout + 10)))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    processes = []
    for rank in (0, 1):
        env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank),
                   WORLD_SIZE="2", LOCAL_RANK=str(rank))
        processes.append(subprocess.Popen([sys.executable, str(script), str(folder)], env=env, cwd=folder))
    deadline = time.monotonic() + timeout
    try:
        for process in processes:
            process.wait(timeout=max(1, deadline - time.monotonic()))
    finally:
        for process in processes:  # a rank still waiting after the deadline must not outlive the test
            if process.poll() is None:
                process.kill()
                process.wait()
    return [_outcome(folder / f"rank{rank}.json", timeout) for rank in (0, 1)]


def _outcome(path: pathlib.Path, timeout: float) -> dict:
    """What a rank wrote, or a "Timeout" outcome when it wrote nothing before it was stopped."""
    if path.is_file():
        return json.loads(path.read_text())
    return {"error": "Timeout", "message": f"{path.stem} wrote no outcome within {timeout} s", "seconds": timeout}
