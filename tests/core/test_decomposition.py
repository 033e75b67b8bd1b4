"""The top right singular vectors of W C: every method against the exact SVD, with a bound on the subspace error."""

import pytest
import torch

from tlora import projector_distance, top_right_singular_vectors
from tlora.initialization import captured_energy


def _matrix(m, n, decay, seed=0):
    generator = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=generator, dtype=torch.float64))
    singular = decay ** torch.arange(min(m, n), dtype=torch.float64)
    return (u * singular) @ v.t()


@pytest.mark.parametrize("shape", [(48, 32), (32, 80)])
@pytest.mark.parametrize("method", ["gram", "exact"])
def test_direct_methods_match_the_exact_svd(shape, method):
    matrix = _matrix(*shape, decay=0.9)
    exact = torch.linalg.svd(matrix)[2][:8]
    rows = top_right_singular_vectors(matrix, 8, method)
    assert rows.shape == (8, shape[1])
    assert torch.allclose(rows @ rows.t(), torch.eye(8, dtype=torch.float64), atol=1e-10)
    assert projector_distance(rows, exact) < 1e-8


def test_gram_keeps_the_subspace_under_a_wide_singular_value_range():
    # sigma_1 / sigma_8 = 1e6: squaring it in the Gram matrix is harmless in float64.
    matrix = _matrix(64, 64, decay=0.14).float()  # statistics arrive in float32
    exact = torch.linalg.svd(matrix.double())[2][:8]
    assert projector_distance(top_right_singular_vectors(matrix, 8, "gram"), exact) < 1e-6


def test_randomized_is_accurate_when_the_spectrum_has_a_gap():
    matrix = _matrix(128, 96, decay=0.8)
    exact = torch.linalg.svd(matrix)[2][:16]
    rows = top_right_singular_vectors(matrix, 16, "randomized", oversampling=16, niter=8)
    assert projector_distance(rows, exact) < 1e-6
    assert captured_energy(matrix, rows, exact) > 1 - 1e-10


def test_randomized_on_a_flat_spectrum_still_captures_the_energy():
    generator = torch.Generator().manual_seed(3)
    matrix = torch.randn(128, 128, generator=generator, dtype=torch.float64)
    exact = torch.linalg.svd(matrix)[2][:16]
    rows = top_right_singular_vectors(matrix, 16, "randomized", oversampling=16, niter=8)
    assert captured_energy(matrix, rows, exact) > 0.95


def test_signs_are_deterministic_across_methods():
    matrix = _matrix(40, 40, decay=0.7)
    first = top_right_singular_vectors(matrix, 5, "gram")
    second = top_right_singular_vectors(matrix, 5, "exact")
    assert torch.allclose(first, second, atol=1e-8)


def test_rank_deficient_products_still_give_orthonormal_rows():
    matrix = _matrix(32, 48, decay=0.5)
    matrix[:, :] = torch.outer(matrix[:, 0], matrix[0, :])  # rank one
    rows = top_right_singular_vectors(matrix, 6, "gram")
    assert torch.allclose(rows @ rows.t(), torch.eye(6, dtype=torch.float64), atol=1e-8)


def test_k_out_of_range():
    with pytest.raises(ValueError):
        top_right_singular_vectors(torch.eye(4), 5)
