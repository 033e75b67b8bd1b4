"""Step 3 of TLoRA: A_l = top r_l right singular vectors of M_l = W_l C_l (rows orthonormal), B_l = 0, A_l frozen."""

from __future__ import annotations

import hashlib
import logging
from typing import Optional

import torch

from . import distributed
from .allocation import TLoRAPlan
from .statistics import TargetModule, TLoRAStatistics

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
    rows, cols = matrix.shape
    if not 0 < k <= min(rows, cols):
        raise ValueError(f"k={k} must be in [1, min{tuple(matrix.shape)}]")
    m = matrix.to(torch.float64)
    if method == "exact":
        _, _, vh = torch.linalg.svd(m, full_matrices=False)
        top = vh[:k]
    elif method == "gram":
        gram = m.t() @ m if cols <= rows else m @ m.t()
        values, vectors = torch.linalg.eigh(gram)
        if _gram_error_bound(values, k) > GRAM_TOLERANCE:
            # The squared spectrum is too wide (or the gap after k too narrow) for the Gram route to resolve the
            # subspace: take the exact SVD for this matrix.
            _, _, vh = torch.linalg.svd(m, full_matrices=False)
            top = vh[:k]
        elif cols <= rows:
            top = vectors[:, -k:].flip(-1).t()
        else:
            top = _orthonormal_columns(m.t() @ vectors[:, -k:].flip(-1)).t()
    elif method == "randomized":
        width = min(cols, k + oversampling)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        basis = torch.randn(cols, width, generator=generator, dtype=torch.float64).to(m.device)
        basis = torch.linalg.qr(m.t() @ (m @ basis))[0]
        for _ in range(niter):
            basis = torch.linalg.qr(m.t() @ torch.linalg.qr(m @ basis)[0])[0]
        _, _, vh = torch.linalg.svd(m @ basis, full_matrices=False)
        top = (basis @ vh.t())[:, :k].t()
    else:
        raise ValueError(f"unknown svd method {method!r}; use 'gram', 'exact' or 'randomized'")
    return _normalise_signs(top)


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
    broadcast from the rank that computed it.
    """
    rank, world_size = distributed.rank_and_world_size()
    by_name = {t.name: t for t in targets}
    adapted = [entry for entry in plan.modules if entry.rank > 0]
    missing = [entry.name for entry in adapted if entry.name not in by_name]
    if missing:
        raise ValueError(f"the plan names modules that are not targets of this model: {missing[:5]}")
    iterator = adapted
    if show_progress and rank == 0 and len(adapted) > 8:
        from tqdm.auto import tqdm

        iterator = tqdm(adapted, desc="TLoRA decompositions", unit="module")
    lora_A: dict[str, torch.Tensor] = {}
    deficient = []
    for index, entry in enumerate(iterator):
        target = by_name[entry.name]
        if index % world_size != rank:
            lora_A[entry.name] = torch.empty(entry.rank, target.in_features, dtype=torch.float32)
            continue
        record = statistics.module(entry.name)
        stored = statistics.covariances.get(record.covariance_key, statistics.cross_covariances.get(entry.name))
        device = stored.device if stored is not None else target.module.weight.device
        weight = target.weight_matrix(torch.float64).to(device)
        product = statistics.weighted_covariance(entry.name, weight)  # M = W C, float64
        top = top_right_singular_vectors(product, entry.rank, method, oversampling=oversampling, niter=niter)
        if entry.rank > 1:
            singular = torch.linalg.vector_norm(product @ top.t(), dim=0)
            if singular[-1] <= 1e-10 * singular[0]:
                deficient.append(entry.name)
        lora_A[entry.name] = top.to(device="cpu", dtype=torch.float32).contiguous()
        del product, weight
    if deficient:
        logger.warning(
            "W C has fewer significant directions than the allocated rank for %d modules (too few calibration "
            "tokens?); their extra directions of A are arbitrary orthonormal vectors: %s",
            len(deficient),
            deficient[:5],
        )
    if world_size > 1:
        for index, entry in enumerate(adapted):
            distributed.broadcast_(lora_A[entry.name], src=index % world_size)
    return lora_A


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
