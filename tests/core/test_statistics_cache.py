"""A statistics cache records which calibration rows made it and is reused only for the same rows."""

import copy
import re
import subprocess

import pytest
import torch
from safetensors import safe_open

from conftest import LLAMA_TARGETS, CountingBatches, pad_batches
from tlora import CalibrationError, StatisticsMismatchError, TLoRAConfig, TLoRAStatistics, get_tlora_model
from tlora.calibration.cache import RowDigest
from tlora.targets import weight_fingerprint
from tlora.fixtures.toy import tiny_llama
from two_ranks import run_two_ranks


def _config(**overrides):
    values = dict(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, task_type="CAUSAL_LM")
    values.update(overrides)
    return TLoRAConfig(**values)


def _calibrate(llama, batches, cache, config=None, **kwargs):
    return get_tlora_model(copy.deepcopy(llama), config or _config(), batches, statistics_cache=cache,
                           show_progress=False, **kwargs)


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


def _tensor_data_start(path):
    """Where a safetensors file's tensor bytes begin (after the 8-byte length and the JSON header)."""
    with open(path, "rb") as handle:
        return 8 + int.from_bytes(handle.read(8), "little")


def test_a_cache_whose_tensor_bytes_were_changed_is_refused(llama, samples, tmp_path):
    cache = tmp_path / "cache.safetensors"
    _calibrate(llama, pad_batches(samples, 3), cache)
    data = bytearray(cache.read_bytes())
    start = _tensor_data_start(cache)
    middle = (start + len(data)) // 2
    data[middle : middle + 4] = bytes(b ^ 0x40 for b in data[middle : middle + 4])  # the header stays intact
    cache.write_bytes(bytes(data))
    message = rf"{re.escape(str(cache))} do not match the SHA-256 digest in its header.*delete it to recalibrate"
    with pytest.raises(StatisticsMismatchError, match=message):
        _calibrate(llama, pad_batches(samples, 3), cache)


def test_a_cache_from_another_sensitivity_mode_is_refused(llama, samples, tmp_path):
    cache = tmp_path / "cache.safetensors"
    _calibrate(llama, pad_batches(samples, 3), cache)
    with pytest.raises(StatisticsMismatchError, match=r"sensitivity: 'per_sample' in the cache, 'batch' now"):
        _calibrate(llama, pad_batches(samples, 3), cache, config=_config(sensitivity="batch"))


def test_a_base_weight_changed_anywhere_is_seen_by_the_fingerprint(samples, tmp_path):
    # down_proj is 64 x 160 = 10240 elements: a fingerprint of 4096 strided samples would read the even ones only.
    model = tiny_llama(hidden_size=64, num_layers=1, intermediate_size=160, num_heads=4, seed=0)
    cache = tmp_path / "cache.safetensors"
    _calibrate(model, pad_batches(samples, 3), cache)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.view(-1)[1] += 0.5
    message = r"cache .* does not fit this model: the weights of model\.layers\.0\.mlp\.down_proj differ"
    with pytest.raises(StatisticsMismatchError, match=message):
        _calibrate(model, pad_batches(samples, 3), cache)


def test_the_weight_fingerprint_reads_every_element_and_not_the_load_dtype():
    weight = torch.randn(128, 128, generator=torch.Generator().manual_seed(0)).bfloat16().float()
    reference = weight_fingerprint(weight)
    assert weight_fingerprint(weight.bfloat16()) == reference  # a float32 and a bfloat16 load of one checkpoint
    changed = set()
    for position in range(0, weight.numel(), 997):  # positions spread over the whole matrix, odd and even
        other = weight.clone()
        other.view(-1)[position] += 0.25
        changed.add(weight_fingerprint(other) != reference)
    assert changed == {True}


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_an_unreadable_cache_is_refused_with_its_path(llama, samples, tmp_path, damage):
    cache = tmp_path / "cache.safetensors"
    _calibrate(llama, pad_batches(samples, 3), cache)
    data = cache.read_bytes()
    cache.write_bytes(data[: len(data) // 2] if damage == "truncated" else bytes(range(256)) * 20)
    message = rf"the statistics file {re.escape(str(cache))} cannot be read.*delete it to recalibrate"
    with pytest.raises(StatisticsMismatchError, match=message):
        _calibrate(llama, pad_batches(samples, 3), cache)


def _make_read_only(folder):
    """Make `folder` refuse new files, also to root (immutable attribute); False where that is not possible."""
    folder.chmod(0o555)
    probe = folder / "probe"
    try:
        probe.write_text("")
    except OSError:
        return True
    probe.unlink()
    immutable = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
    return immutable and not _can_write(folder)


def _can_write(folder):
    try:
        (folder / "probe").write_text("")
    except OSError:
        return False
    (folder / "probe").unlink()
    return True


@pytest.mark.parametrize("where", ["read-only folder", "folder that is a file"])
def test_an_unwritable_cache_location_fails_before_the_calibration_pass(llama, samples, tmp_path, where):
    folder = tmp_path / "caches"
    if where == "folder that is a file":
        folder.write_text("not a folder")
    else:
        folder.mkdir()
    batches = CountingBatches(pad_batches(samples, 3))
    try:
        if where == "read-only folder" and not _make_read_only(folder):
            pytest.skip("no way to make a folder read-only here")
        message = rf"statistics cache {re.escape(str(folder / 'cache.safetensors'))} cannot be written"
        with pytest.raises(CalibrationError, match=message):
            _calibrate(llama, batches, folder / "cache.safetensors")
    finally:
        if folder.is_dir():
            subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
            folder.chmod(0o755)
    assert batches.taken == 0
