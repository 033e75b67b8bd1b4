"""Step 3 of TLoRA: A_l = top r_l right singular vectors of M_l = W_l C_l (rows orthonormal), B_l = 0, A_l frozen."""

from __future__ import annotations

import hashlib
import logging
from typing import Optional

import torch

from . import distributed
from .allocation import TLoRAPlan
from .calibration import TLoRAStatistics
from .errors import DecompositionError
from .targets import TargetModule, check_readable_weights

logger = logging.getLogger(__name__)


def _normalise_signs(rows: torch.Tensor) -> torch.Tensor:
    """Flip each row so that its entry of largest magnitude is positive (a deterministic sign convention)."""
    index = rows.abs().argmax(dim=1, keepdim=True)
    signs = torch.sign(rows.gather(1, index))
    signs[signs == 0] = 1
    return rows * signs


def _orthonormal_columns(matrix: torch.Tensor) -> torch.Tensor:
    q, r = torch.linalg.qr(matrix)
    # Keep the direction of each input column (QR may flip signs).
    diagonal = torch.sign(torch.diagonal(r))
    diagonal[diagonal == 0] = 1
    return q * diagonal


GRAM_TOLERANCE = 1e-8


def _gram_error_bound(eigenvalues: torch.Tensor, k: int) -> float:
    """A Davis-Kahan estimate of the top-k subspace error of a float64 eigh: eps * lambda_1 / (lambda_k - lambda_k+1)."""
    largest = float(eigenvalues[-1])
    kth = float(eigenvalues[-k])
    following = float(eigenvalues[-k - 1]) if eigenvalues.numel() > k else 0.0
    gap = kth - max(following, 0.0)
    if largest <= 0:
        return 0.0
    if gap <= 0:
        return float("inf")
    return torch.finfo(torch.float64).eps * largest / gap


def top_right_singular_vectors(
    matrix: torch.Tensor,
    k: int,
    method: str = "gram",
    *,
    oversampling: int = 16,
    niter: int = 8,
    seed: int = 0,
) -> torch.Tensor:
    """The top-k right singular vectors of `matrix` (m x n) as the rows of a (k x n) float64 tensor.

    * "exact": full SVD.
    * "gram": eigendecomposition of the smaller Gram matrix (M^T M, or M M^T followed by V = M^T U / |.|) in
      float64; where the a-priori error bound eps * lambda_1 / (lambda_k - lambda_k+1) exceeds 1e-8 (a very wide
      spectrum or a vanishing gap after k) that matrix falls back to the exact SVD.
    * "randomized": subspace iteration with `oversampling` extra columns and `niter` power iterations, then
      Rayleigh-Ritz; fast, but accurate only when the spectrum has a gap after k (see the tests and benchmarks).
    """
    return _top_right_singular(matrix, k, method, oversampling=oversampling, niter=niter, seed=seed)[0]


def _top_right_singular(
    matrix: torch.Tensor, k: int, method: str, *, oversampling: int = 16, niter: int = 8, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-k right singular vectors as rows, their singular values), both float64."""
    rows, cols = matrix.shape
    if not 0 < k <= min(rows, cols):
        raise ValueError(f"k={k} must be in [1, min{tuple(matrix.shape)}]")
    m = matrix.to(torch.float64)
    if method == "gram":
        gram = m.t() @ m if cols <= rows else m @ m.t()
        values, vectors = torch.linalg.eigh(gram)
        if _gram_error_bound(values, k) <= GRAM_TOLERANCE:
            singular = values[-k:].flip(-1).clamp_min(0).sqrt()
            if cols <= rows:
                return _normalise_signs(vectors[:, -k:].flip(-1).t()), singular
            return _normalise_signs(_orthonormal_columns(m.t() @ vectors[:, -k:].flip(-1)).t()), singular
        # The squared spectrum is too wide (or the gap after k too narrow) for the Gram route to resolve the
        # subspace: take the exact SVD for this matrix.
        method = "exact"
    if method == "exact":
        _, singular, vh = torch.linalg.svd(m, full_matrices=False)
        return _normalise_signs(vh[:k]), singular[:k]
    if method == "randomized":
        width = min(cols, k + oversampling)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        basis = torch.randn(cols, width, generator=generator, dtype=torch.float64).to(m.device)
        basis = torch.linalg.qr(m.t() @ (m @ basis))[0]
        for _ in range(niter):
            basis = torch.linalg.qr(m.t() @ torch.linalg.qr(m @ basis)[0])[0]
        _, singular, vh = torch.linalg.svd(m @ basis, full_matrices=False)
        return _normalise_signs((basis @ vh.t())[:, :k].t()), singular[:k]
    raise ValueError(f"unknown svd method {method!r}; use 'gram', 'exact' or 'randomized'")


def compute_lora_A(
    targets: list[TargetModule],
    statistics: TLoRAStatistics,
    plan: TLoRAPlan,
    *,
    method: str = "gram",
    oversampling: int = 16,
    niter: int = 8,
    show_progress: bool = True,
) -> dict[str, torch.Tensor]:
    """A for every adapted module (float32, on the CPU), identical on every rank.

    Under `torch.distributed` the decompositions are shared out (module i on rank i mod world size) and each A is
    broadcast from the rank that computed it. The ranks first agree whether every share succeeded: a failure on one
    rank is raised on every rank, naming that rank and the module, before any broadcast.
    """
    rank, world_size = distributed.rank_and_world_size()
    adapted = [entry for entry in plan.modules if entry.rank > 0]
    owned = [entry for index, entry in enumerate(adapted) if index % world_size == rank]
    options = {"method": method, "oversampling": oversampling, "niter": niter}
    share = distributed.run_agreed(
        lambda: _decompose_share(targets, statistics, adapted, owned, options, show_progress and rank == 0)
    )
    in_features = {target.name: target.in_features for target in targets}
    # The other ranks' A arrive by broadcast into buffers of the same shape and dtype.
    lora_A = {
        entry.name: share[entry.name]
        if entry.name in share
        else torch.empty(entry.rank, in_features[entry.name], dtype=torch.float32)
        for entry in adapted
    }
    if world_size > 1:
        for index, entry in enumerate(adapted):
            distributed.broadcast_(lora_A[entry.name], src=index % world_size)
    return lora_A


def _decompose_share(
    targets: list[TargetModule],
    statistics: TLoRAStatistics,
    adapted: list,
    owned: list,
    options: dict,
    show_progress: bool,
) -> dict[str, torch.Tensor]:
    """A for the `owned` entries of the plan (this rank's share of the `adapted` ones), float32 on the CPU."""
    check_readable_weights(targets)
    by_name = {t.name: t for t in targets}
    missing = [entry.name for entry in adapted if entry.name not in by_name]
    if missing:
        raise ValueError(f"the plan names modules that are not targets of this model: {missing[:5]}")

    def decompose(entry) -> tuple[torch.Tensor, bool]:
        try:
            return _decompose(by_name[entry.name], statistics, entry.rank, options)
        except Exception as error:
            kind = type(error).__name__.lstrip("_")  # torch.linalg.LinAlgError is torch._C._LinAlgError
            raise DecompositionError(
                f"decomposing W C of {entry.name} (its top {entry.rank} directions, svd_method="
                f"{options['method']!r}) failed: {kind}: {error}. If it ran out of memory, keep the statistics on "
                "the CPU (statistics_device='cpu'); if the solver did not converge, try svd_method='exact'"
            ) from error

    progress = None
    if show_progress and len(owned) > 8:
        from tqdm.auto import tqdm

        progress = tqdm(total=len(owned), desc="TLoRA decompositions", unit="module")
    stored = (*statistics.covariances.values(), *statistics.cross_covariances.values())
    on_cpu = all(tensor.device.type == "cpu" for tensor in stored)
    results = {}
    for entry, result in zip(owned, _map_decompositions(decompose, owned, progress, parallel=on_cpu)):
        results[entry.name] = result
    if progress is not None:
        progress.close()
    deficient = [name for name, (_, flag) in results.items() if flag]
    if deficient:
        logger.warning(
            "W C has fewer significant directions than the allocated rank for %d modules (too few calibration "
            "tokens?); their extra directions of A are arbitrary orthonormal vectors: %s",
            len(deficient),
            deficient[:5],
        )
    return {name: top for name, (top, _) in results.items()}


def _decompose(target: TargetModule, statistics: TLoRAStatistics, k: int, options: dict) -> tuple[torch.Tensor, bool]:
    """(The top-k right singular vectors of M = W C as float32 rows on the CPU, whether M has fewer than k)."""
    record = statistics.module(target.name)
    stored = statistics.covariances.get(record.covariance_key, statistics.cross_covariances.get(target.name))
    device = stored.device if stored is not None else target.module.weight.device
    dtype = stored.dtype if stored is not None else torch.float32
    # M = W C in the statistics' own precision (float32 by default); the decomposition itself runs in float64.
    product = statistics.weighted_covariance(target.name, target.weight_matrix(dtype).to(device))
    top, singular = _top_right_singular(product, k, **options)
    deficient = k > 1 and bool(singular[-1] <= 1e-10 * singular[0])
    return top.to(device="cpu", dtype=torch.float32).contiguous(), deficient


def _map_decompositions(function, entries: list, progress, parallel: bool) -> list:
    """`function` over `entries`; on the CPU several single-threaded decompositions run side by side, which keeps
    all cores busy where one LAPACK call on a small matrix cannot."""
    threads = torch.get_num_threads()
    if threads <= 1 or len(entries) < 2 or not parallel:
        results = []
        for entry in entries:
            results.append(function(entry))
            if progress is not None:
                progress.update(1)
        return results
    from concurrent.futures import ThreadPoolExecutor

    def run(entry):
        result = function(entry)
        if progress is not None:
            progress.update(1)
        return result

    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            return list(pool.map(run, entries))
    finally:
        torch.set_num_threads(threads)


def digest_lora_A(lora_A: dict[str, torch.Tensor]) -> bytes:
    """A SHA-256 digest of all A matrices (names, shapes and bytes), for cross-rank and resume checks."""
    digest = hashlib.sha256()
    for name in sorted(lora_A):
        tensor = lora_A[name].detach().to(device="cpu", dtype=torch.float32).contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.numpy().tobytes())
    return digest.digest()


def projector_distance(first: torch.Tensor, second: torch.Tensor) -> float:
    """|| P1 - P2 ||_F / sqrt(2k) for the row spaces of two (k x n) orthonormal matrices: 0 equal, 1 orthogonal.

    Computed as || A1^T - A2^T A2 A1^T ||_F / sqrt(k) (the sines of the principal angles), which has no
    cancellation, so distances down to the float64 rounding level are resolved.
    """
    first, second = first.double(), second.to(first.device).double()
    residual = first.t() - second.t() @ (second @ first.t())
    return float(torch.linalg.matrix_norm(residual) / first.shape[0] ** 0.5)


def captured_energy(matrix: torch.Tensor, rows: torch.Tensor, reference: Optional[torch.Tensor] = None) -> float:
    """|| M V ||_F^2 for V = rows^T, divided by the same for `reference` when given (1.0: as good as the optimum)."""
    value = torch.linalg.matrix_norm(matrix.double() @ rows.double().t()) ** 2
    if reference is not None:
        value = value / torch.linalg.matrix_norm(matrix.double() @ reference.double().t()) ** 2
    return float(value)
