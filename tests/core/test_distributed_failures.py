"""One rank's failure becomes the same clear error on every rank, promptly, instead of a hang in a collective."""

import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap
import time

import pytest

HERE = pathlib.Path(__file__).resolve().parent

WORKER = textwrap.dedent(
    """
    import datetime, json, sys, time
    import torch, torch.distributed as dist
    sys.path.insert(0, {here!r})
    from conftest import LLAMA_TARGETS, make_samples, pad_batches
    from tlora import TLoRAConfig, compute_statistics
    from tlora.toy import byte_tokenizer, tiny_llama

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=90))
    rank = dist.get_rank()
    model = tiny_llama(hidden_size=32, num_layers=2, intermediate_size=48, num_heads=4, seed=0)
    with torch.no_grad():
        model.get_input_embeddings().weight[259] = float("nan")  # a token whose embedding is NaN
    batches = pad_batches(make_samples(byte_tokenizer()), 2)
    batches[1]["input_ids"][0, 3] = 259  # batch 1 goes to rank 1
    config = TLoRAConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, task_type="CAUSAL_LM")
    start = time.monotonic()
    try:
        compute_statistics(model, batches, config, show_progress=False)
        outcome = {{"error": None}}
    except Exception as error:
        outcome = {{"error": type(error).__name__, "message": str(error)}}
    outcome["seconds"] = time.monotonic() - start
    with open(sys.argv[1] + f"/rank{{rank}}.json", "w") as handle:
        json.dump(outcome, handle)
    """
)


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_a_nan_batch_on_one_rank_raises_the_same_error_on_both_ranks(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(here=str(HERE)))
    port = str(_free_port())
    processes = []
    for rank in (0, 1):
        env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank),
                   WORLD_SIZE="2", LOCAL_RANK=str(rank))
        processes.append(subprocess.Popen([sys.executable, str(script), str(tmp_path)], env=env, cwd=tmp_path))
    deadline = time.monotonic() + 150
    for process in processes:
        process.wait(timeout=max(1, deadline - time.monotonic()))
    outcomes = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [o["error"] for o in outcomes] == ["NonFiniteCalibrationError"] * 2
    assert outcomes[0]["message"] == outcomes[1]["message"]
    assert outcomes[0]["message"].startswith("rank 1 failed: NonFiniteCalibrationError: non-finite value")
    assert "calibration sample 2" in outcomes[0]["message"]
    assert max(o["seconds"] for o in outcomes) < 20
