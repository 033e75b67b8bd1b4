"""One rank's failure becomes the same clear error on every rank, promptly, instead of a hang in a collective."""

import re

import pytest
import torch

from conftest import LLAMA_TARGETS, pad_batches
from tlora import (
    DecompositionError, TLoRAConfig, compute_lora_A, compute_statistics, find_target_modules, plan_from_statistics,
)
from two_ranks import run_two_ranks

NAN_ON_RANK_1 = """
with torch.no_grad():
    model.get_input_embeddings().weight[259] = float("nan")  # a token whose embedding is NaN
batches[1]["input_ids"][0, 3] = 259  # batch 1 goes to rank 1

def calibrate():
    compute_statistics(model, batches, config, show_progress=False)
"""


@pytest.mark.slow
def test_a_nan_batch_on_one_rank_raises_the_same_error_on_both_ranks(tmp_path):
    outcomes = run_two_ranks(NAN_ON_RANK_1, tmp_path)
    assert [o["error"] for o in outcomes] == ["NonFiniteCalibrationError"] * 2
    assert outcomes[0]["message"] == outcomes[1]["message"]
    assert outcomes[0]["message"].startswith("rank 1 failed: NonFiniteCalibrationError: non-finite value")
    assert "calibration sample 2" in outcomes[0]["message"]
    assert max(o["seconds"] for o in outcomes) < 20


# One two-rank run, two failures in turn (a process start costs seconds). First rank 1 holds other base weights;
# then, with equal weights, rank 1's eigensolver fails (as LAPACK does on an ill-conditioned matrix). A failed rank
# stays alive (see two_ranks), as a trainer that logs the error would.
TWO_FAILURES_ON_RANK_1 = """
class Recorded(list):
    def __iter__(self):
        RECORD["pass_started"] = True
        return super().__iter__()

def failing_eigh(*args, **kwargs):
    raise torch.linalg.LinAlgError("linalg.eigh: injected failure to converge")

def outcome(call):
    start = time.monotonic()
    try:
        call()
        return {"error": None, "seconds": time.monotonic() - start}
    except Exception as error:
        return {"error": type(error).__name__, "message": str(error), "seconds": time.monotonic() - start}

def calibrate():
    RECORD["pass_started"] = False
    with torch.no_grad():
        if rank == 1:
            model.model.layers[1].mlp.up_proj.weight[0, 0] += 1.0  # another checkpoint, as far as TLoRA can tell
    calibration_data = Recorded(batches[:2])
    RECORD["different_weights"] = outcome(lambda: get_tlora_model(model, config, calibration_data, show_progress=False))
    fresh = tiny_llama(hidden_size=32, num_layers=2, intermediate_size=48, num_heads=4, seed=0)
    if rank == 1:
        torch.linalg.eigh = failing_eigh
    get_tlora_model(fresh, config, batches[:2], show_progress=False)
"""


@pytest.fixture(scope="module")
def two_failures(tmp_path_factory):
    """Per rank: the outcome of the failed decomposition, with the different-weights outcome under its key."""
    return run_two_ranks(TWO_FAILURES_ON_RANK_1, tmp_path_factory.mktemp("two_failures"), collective_timeout=60)


@pytest.mark.slow
def test_ranks_with_different_base_weights_fail_before_the_calibration_pass(two_failures):
    outcomes = [rank["different_weights"] for rank in two_failures]
    assert [o["error"] for o in outcomes] == ["CalibrationError"] * 2
    assert outcomes[0]["message"] == outcomes[1]["message"]
    assert outcomes[0]["message"].startswith(
        "the base weights differ between ranks: rank 1 holds other weights than rank 0 for "
        "model.layers.1.mlp.up_proj (1 of 14 target modules). Every rank must load the same base model"
    )
    assert [rank["pass_started"] for rank in two_failures] == [False, False]
    assert max(o["seconds"] for o in outcomes) < 30


@pytest.mark.slow
def test_a_failed_decomposition_on_one_rank_raises_the_same_error_on_both_ranks(two_failures):
    assert [o["error"] for o in two_failures] == ["DecompositionError"] * 2
    assert two_failures[0]["message"] == two_failures[1]["message"]
    named = re.match(
        r"rank 1 failed: DecompositionError: decomposing W C of (model\.layers\.\d\.\w+\.\w+) \(its top \d+ "
        r"directions, svd_method='gram'\) failed: LinAlgError: linalg.eigh: injected failure to converge",
        two_failures[0]["message"],
    )
    assert named is not None, two_failures[0]["message"]
    assert named.group(1).split(".")[-1] in LLAMA_TARGETS
    # Both ranks end promptly: no rank waits for a broadcast until the collective timeout (60 s here).
    assert max(o["seconds"] for o in two_failures) < 30


def test_a_failed_decomposition_names_the_module(llama, samples, monkeypatch):
    config = TLoRAConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, task_type="CAUSAL_LM")
    statistics = compute_statistics(llama, pad_batches(samples[:2], 2), config, show_progress=False)
    plan = plan_from_statistics(statistics, config)
    first = next(entry for entry in plan.modules if entry.rank > 0)

    def failing_eigh(*args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.eigh: injected failure to converge")

    monkeypatch.setattr(torch.linalg, "eigh", failing_eigh)
    with pytest.raises(DecompositionError) as caught:
        compute_lora_A(find_target_modules(llama, config), statistics, plan, show_progress=False)
    assert str(caught.value).startswith(
        f"decomposing W C of {first.name} (its top {first.rank} directions, svd_method='gram') failed: "
        "LinAlgError: linalg.eigh: injected failure to converge. If it ran out of memory"
    )
    assert isinstance(caught.value.__cause__, torch.linalg.LinAlgError)
