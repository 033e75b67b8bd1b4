"""Fixtures of the training tests: a tiny Llama and tokenizer saved to disk, and a ready DeepSpeed CPU launcher."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random 2-layer Llama (hidden 64, all seven projections) and the byte-level tokenizer, saved to disk."""
    from tlora.fixtures.toy_model import write_toy_model

    return write_toy_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def byte_tokenizer():
    """The in-memory byte-level tokenizer (260 tokens, BOS added, EOS id 2)."""
    from tlora.fixtures.toy import byte_tokenizer as build

    return build()


@pytest.fixture(scope="session")
def deepspeed_ready() -> None:
    """DeepSpeed is importable and its CPU communication op is built (a one-time JIT compile of a few minutes,
    cached in ~/.cache/torch_extensions). A build that was killed leaves a `lock` file there that makes every later
    DeepSpeed start wait forever; this fixture fails with that path instead of hanging."""
    pytest.importorskip("deepspeed")
    probe = (
        "from deepspeed.accelerator import get_accelerator\n"
        "builder = get_accelerator().create_op_builder('ShareMemCommBuilder')\n"
        "import deepspeed.ops\n"
        "if builder is not None and deepspeed.ops.__compatible_ops__.get(builder.NAME, False):\n"
        "    builder.load(verbose=False)\n"
    )
    try:
        subprocess.run([sys.executable, "-c", probe], check=True, timeout=600, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        locks = list(Path.home().glob(".cache/torch_extensions/*/deepspeed_shm_comm/lock"))
        pytest.fail(
            "building DeepSpeed's shm comm op did not finish in 10 minutes; if no build is running, remove the stale "
            f"lock file(s) {[str(p) for p in locks]} left by an interrupted build"
        )
    except subprocess.CalledProcessError as error:
        pytest.fail(f"DeepSpeed's CPU communication op does not build here:\n{error.stderr[-3000:]}")
