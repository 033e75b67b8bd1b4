"""One rank's failure becomes the same clear error on every rank, promptly, instead of a hang in a collective."""

import pytest

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
