"""The few `torch.distributed` operations TLoRA needs, each a no-op in a single process."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Optional, TypeVar

import torch
import torch.distributed as dist

from .errors import CalibrationError, DecompositionError, NonFiniteCalibrationError, StatisticsMismatchError

# Errors that keep their class when another rank's failure is raised on this rank; any other becomes a RuntimeError.
_SHARED_ERRORS = {
    cls.__name__: cls
    for cls in (
        CalibrationError, DecompositionError, NonFiniteCalibrationError, StatisticsMismatchError, FileNotFoundError,
        ValueError,
    )
}

T = TypeVar("T")


def is_distributed() -> bool:
    """True when a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world_size() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def communication_device() -> torch.device:
    """The device collective tensors must live on for the current backend."""
    backend = dist.get_backend()
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    if backend not in ("gloo", "mpi") and hasattr(torch, "accelerator") and torch.accelerator.is_available():
        return torch.accelerator.current_accelerator()
    return torch.device("cpu")


def all_reduce_sum_(tensors: Iterable[torch.Tensor]) -> None:
    """Sum each tensor over all ranks, in place."""
    if not is_distributed():
        return
    device = communication_device()
    for tensor in tensors:
        if tensor.device == device:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        else:
            staged = tensor.to(device)
            dist.all_reduce(staged, op=dist.ReduceOp.SUM)
            tensor.copy_(staged.to(tensor.device))


def broadcast_(tensor: torch.Tensor, src: int) -> None:
    """Overwrite `tensor` on every rank with its value on rank `src`, in place."""
    if not is_distributed():
        return
    device = communication_device()
    if tensor.device == device:
        dist.broadcast(tensor, src=src)
    else:
        staged = tensor.to(device)
        dist.broadcast(staged, src=src)
        tensor.copy_(staged.to(tensor.device))


def broadcast_json(obj: Any, src: int = 0) -> Any:
    """`obj` (JSON-serialisable data) as it is on rank `src`; sent as UTF-8 bytes, never pickled."""
    if not is_distributed():
        return obj
    device = communication_device()
    payload = json.dumps(obj).encode() if dist.get_rank() == src else b""
    length = torch.tensor([len(payload)], dtype=torch.int64, device=device)
    dist.broadcast(length, src=src)
    buffer = torch.zeros(int(length.item()), dtype=torch.uint8, device=device)
    if dist.get_rank() == src:
        buffer.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
    dist.broadcast(buffer, src=src)
    return json.loads(bytes(buffer.cpu().tolist()).decode())


def _identical_everywhere(payload: bytes) -> bool:
    """True when `payload` has the same SHA-256 digest on every rank (two all-reduces)."""
    digest = torch.tensor(list(hashlib.sha256(payload).digest()), dtype=torch.int64, device=communication_device())
    low, high = digest.clone(), digest.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    return torch.equal(low, high)


def check_identical_across_ranks(payload: bytes, what: str) -> None:
    """Raise if `payload` differs between ranks (compared through a SHA-256 digest)."""
    if not is_distributed():
        return
    if not _identical_everywhere(payload):
        raise RuntimeError(f"ranks disagree on {what}; every rank must derive the identical TLoRA plan and A")


def differences_from_rank_0(entries: Mapping[str, str]) -> dict[int, list[str]]:
    """For each rank whose `entries` (name -> digest) differ from rank 0's, the names that differ (missing on either
    side included); the same answer on every rank, {} when all agree or without a process group.

    One digest comparison when the ranks agree; only when they do not, every rank's entries are broadcast as JSON.
    """
    if not is_distributed():
        return {}
    entries = {str(name): str(value) for name, value in entries.items()}
    if _identical_everywhere(json.dumps(sorted(entries.items())).encode()):
        return {}
    tables = [broadcast_json(entries, src=source) for source in range(dist.get_world_size())]
    differences = {}
    for source, table in enumerate(tables[1:], start=1):
        names = list(tables[0]) + [name for name in table if name not in tables[0]]
        changed = [name for name in names if table.get(name) != tables[0].get(name)]
        if changed:
            differences[source] = changed
    return differences


def run_agreed(function: Callable[[], T]) -> T:
    """`function()` on every rank; if it raises on any rank, every rank raises that error (see
    `raise_if_any_rank_failed`) instead of going on to a collective that the failed rank never reaches."""
    result, failure = None, None
    try:
        result = function()
    except Exception as error:  # agreed on below
        failure = error
    raise_if_any_rank_failed(failure)
    return result


def raise_if_any_rank_failed(error: Optional[BaseException]) -> None:
    """Raise `error`; under torch.distributed first agree (one all-reduce) whether any rank failed, so the failure of
    one rank becomes the same error on every rank instead of leaving the others waiting in a later collective.

    Call it on every rank at the same point, before the next collective, with the exception this rank caught (or
    None). The error of the lowest failing rank is raised everywhere, naming that rank.
    """
    if not is_distributed():
        if error is not None:
            raise error
        return
    rank, world_size = rank_and_world_size()
    first_failed = torch.tensor([rank if error is not None else world_size], device=communication_device())
    dist.all_reduce(first_failed, op=dist.ReduceOp.MIN)
    source = int(first_failed.item())
    if source == world_size:
        return
    described = [type(error).__name__, str(error)] if rank == source else None
    name, message = broadcast_json(described, src=source)
    agreed = _SHARED_ERRORS.get(name, RuntimeError)(f"rank {source} failed: {name}: {message}")
    raise agreed from error
