"""A statistics cache records which calibration rows made it and is reused only for the same rows."""

import copy

import pytest
import torch
from safetensors import safe_open

from conftest import LLAMA_TARGETS, pad_batches
from tlora import StatisticsMismatchError, TLoRAConfig, TLoRAStatistics, get_tlora_model
from tlora.statistics_cache import RowDigest
from two_ranks import run_two_ranks


def _config():
    return TLoRAConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, task_type="CAUSAL_LM")


def _calibrate(llama, batches, cache, **kwargs):
    return get_tlora_model(copy.deepcopy(llama), _config(), batches, statistics_cache=cache, show_progress=False, **kwargs)


def test_cache_header_records_rows_count_seed_and_cutoff(llama, samples, tmp_path):
    cache = tmp_path / "cache.safetensors"
    _calibrate(llama, pad_batches(samples, 3), cache, calibration_seed=42, calibration_cutoff_len=512)
    with safe_open(str(cache), framework="pt") as handle:
        metadata = handle.metadata()
    digest = RowDigest()
    for batch in pad_batches(samples, 2, side="left"):  # another batching and padding: the same rows
        digest.update(batch)
    assert metadata["calibration.rows"] == str(len(samples)) == "6"
    assert metadata["calibration.rows_sha256"] == digest.hash.hexdigest()
    assert metadata["calibration.seed"] == "42" and metadata["calibration.cutoff_len"] == "512"


def test_cache_is_reused_for_the_same_rows_without_a_calibration_pass(llama, samples, tmp_path):
    cache = tmp_path / "cache.safetensors"
    _calibrate(llama, pad_batches(samples, 3), cache, calibration_seed=1)
    model = copy.deepcopy(llama)
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    get_tlora_model(model, _config(), pad_batches(samples, 2), statistics_cache=cache, show_progress=False,
                    calibration_seed=1)
    assert calls == []


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda s: dict(batches=pad_batches(s[:4], 2)), r"number of rows: 6 in the cache, 4 now"),
        (lambda s: dict(batches=pad_batches(s[::-1], 3)), r"rows \(token ids and labels\): [0-9a-f]{64} in the cache"),
        (lambda s: dict(batches=pad_batches(s, 3), calibration_seed=2), r"seed: 1 in the cache, 2 now"),
        (lambda s: dict(batches=pad_batches(s, 3), calibration_cutoff_len=64), r"cut-off length: 128 in the cache, 64"),
    ],
)
def test_a_cache_from_other_rows_seed_or_cutoff_is_an_error_naming_the_change(llama, samples, tmp_path, change, message):
    cache = tmp_path / "cache.safetensors"
    _calibrate(llama, pad_batches(samples, 3), cache, calibration_seed=1, calibration_cutoff_len=128)
    arguments = dict(calibration_seed=1, calibration_cutoff_len=128)
    arguments.update(change(samples))
    batches = arguments.pop("batches")
    with pytest.raises(StatisticsMismatchError, match=message):
        _calibrate(llama, batches, cache, **arguments)


CACHE_PER_NODE = """
cache = sys.argv[1] + f"/node{rank}/cache.safetensors"  # a filesystem each rank has on its own

def calibrate():
    get_tlora_model(model, config, batches, statistics_cache=cache, show_progress=False)
"""


@pytest.mark.slow
def test_rank_0_decides_on_the_cache_and_a_rank_without_the_file_fails_on_every_rank(llama, samples, tmp_path):
    (tmp_path / "node0").mkdir()
    (tmp_path / "node1").mkdir()
    # Only rank 0's node holds a cache, made from the same rows the workers use.
    _calibrate(llama, pad_batches(samples, 2), tmp_path / "node0" / "cache.safetensors")
    outcomes = run_two_ranks(CACHE_PER_NODE, tmp_path)
    assert [o["error"] for o in outcomes] == ["FileNotFoundError"] * 2
    assert outcomes[0]["message"] == outcomes[1]["message"]
    assert "rank 1 has no such file" in outcomes[0]["message"] and "every rank sees it" in outcomes[0]["message"]
    assert max(o["seconds"] for o in outcomes) < 20


@pytest.mark.slow
def test_a_cache_only_on_another_rank_is_ignored_when_rank_0_has_none(llama, samples, tmp_path):
    (tmp_path / "node0").mkdir()
    (tmp_path / "node1").mkdir()
    # Only rank 1's node holds a cache (from other rows): rank 0 decides to calibrate, so every rank does.
    _calibrate(llama, pad_batches(samples[:4], 2), tmp_path / "node1" / "cache.safetensors")
    outcomes = run_two_ranks(CACHE_PER_NODE, tmp_path)
    assert [o["error"] for o in outcomes] == [None, None]
    assert TLoRAStatistics.load(tmp_path / "node0" / "cache.safetensors").calibration["rows"] == str(len(samples))
