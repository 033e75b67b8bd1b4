"""Shared test settings: everything runs offline on the CPU with tiny models built from configs."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# $TLORA_SHARED_DATA (as in the benchmarks) for a checkout that does not sit beside shared/.
SHARED_DATA = pathlib.Path(os.environ.get("TLORA_SHARED_DATA") or REPO_ROOT.parent / "shared" / "data")


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """The public test sets ($TLORA_SHARED_DATA, else ../shared/data); tests that need them skip without them."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is not available (set TLORA_SHARED_DATA to the shared data folder)")
    return SHARED_DATA
