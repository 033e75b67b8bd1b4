"""Two CPU processes (gloo) calibrate on their shares of the batches and end with one plan and one A."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from conftest import LLAMA_TARGETS, pad_batches
from tlora import TLoRAConfig, get_tlora_model, projector_distance

HERE = pathlib.Path(__file__).resolve().parent

WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch, torch.distributed as dist
    from safetensors.torch import save_file
    sys.path.insert(0, {here!r})
    from conftest import LLAMA_TARGETS, make_samples, pad_batches
    from tlora import TLoRAConfig, get_tlora_model
    from tlora.fixtures.toy import byte_tokenizer, tiny_llama

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = tiny_llama(hidden_size=32, num_layers=2, intermediate_size=48, num_heads=4, seed=0)
    batches = pad_batches(make_samples(byte_tokenizer()), 2)
    config = TLoRAConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, task_type="CAUSAL_LM")
    peft_model = get_tlora_model(model, config, batches, show_progress=False)
    out = sys.argv[1]
    lora_A = {{n: p.detach().contiguous() for n, p in peft_model.named_parameters() if "lora_A" in n}}
    save_file(lora_A, os.path.join(out, f"A_rank{{rank}}.safetensors"))
    with open(os.path.join(out, f"plan_rank{{rank}}.json"), "w") as handle:
        handle.write(peft_model.base_model.tlora_plan().to_json())
    dist.destroy_process_group()
    """
)


@pytest.mark.slow
def test_two_processes_derive_the_plan_and_A_of_one_process(llama, samples, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(here=str(HERE)))
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
         str(script), str(tmp_path)],
        check=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    plans = [json.loads((tmp_path / f"plan_rank{r}.json").read_text()) for r in (0, 1)]
    assert plans[0] == plans[1]
    a0, a1 = (load_file(str(tmp_path / f"A_rank{r}.safetensors")) for r in (0, 1))
    assert a0.keys() == a1.keys() and all(torch.equal(a0[k], a1[k]) for k in a0)

    config = TLoRAConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, task_type="CAUSAL_LM")
    single = get_tlora_model(llama, config, pad_batches(samples, 2), show_progress=False)
    plan = single.base_model.tlora_plan()
    assert [m["rank"] for m in plans[0]["modules"]] == [m.rank for m in plan.modules]
    assert plans[0]["num_samples"] == plan.num_samples == len(samples)
    singles = {n: p.detach() for n, p in single.named_parameters() if "lora_A" in n}
    assert singles.keys() == a0.keys()
    for name, value in singles.items():
        assert projector_distance(a0[name], value) < 1e-5, name
    for got, expected in zip(plans[0]["modules"], plan.modules):
        assert got["sensitivity"] == pytest.approx(expected.sensitivity, rel=1e-5)
