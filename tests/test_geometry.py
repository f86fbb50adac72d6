"""The closed-form PCA behind estimated normals: covariances and smallest eigenvectors."""

from __future__ import annotations

import numpy as np
import pytest

from neusdf.geometry import neighbourhood_covariances, pca_normals, smallest_eigenvectors

_ENTRIES = ([0, 0, 0, 1, 1, 2], [0, 1, 2, 1, 2, 2])


def full(cov6: np.ndarray) -> np.ndarray:
    """(N, 6) entries 00 01 02 11 12 22 -> (N, 3, 3) symmetric matrices."""
    m = np.zeros((len(cov6), 3, 3))
    m[:, _ENTRIES[0], _ENTRIES[1]] = cov6
    m[:, _ENTRIES[1], _ENTRIES[0]] = cov6
    return m


def packed(m: np.ndarray) -> np.ndarray:
    return m[:, _ENTRIES[0], _ENTRIES[1]]


def random_spd(n: int, seed: int) -> np.ndarray:
    """Symmetric PSD matrices with eigenvalue ratios from 1 to 1e12 (rounded to float64)."""
    rng = np.random.default_rng(seed)
    rot, _ = np.linalg.qr(rng.normal(size=(n, 3, 3)))
    lam = np.sort(10.0 ** rng.uniform(-12, 0, size=(n, 3)), axis=1)
    return np.einsum("nij,nj,nkj->nik", rot, lam, rot)


def test_smallest_eigenvectors_agree_with_lapack():
    m = random_spd(200000, seed=0)
    vals, vecs = np.linalg.eigh(m)
    got = smallest_eigenvectors(packed(m))
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-12)
    # sin of the angle to LAPACK's vector, where the smallest eigenvalue stands apart (where
    # it does not, every vector of the near-degenerate plane is as good)
    sin = np.linalg.norm(np.cross(got, vecs[:, :, 0]), axis=1)
    gap = (vals[:, 1] - vals[:, 0]) / (vals[:, 2] - vals[:, 0])
    assert (gap > 1e-3).mean() > 0.5  # most of them by the closed form
    assert sin[gap > 1e-6].max() < 1e-9
    # and everywhere a vector of the smallest eigenvalue, to rounding of the largest
    residual = np.linalg.norm(np.einsum("nij,nj->ni", m, got) - vals[:, :1] * got, axis=1)
    assert residual.max() < 1e-13 * vals[:, 2].max()


def test_smallest_eigenvectors_of_degenerate_matrices():
    cases = np.array(
        [
            [2.0, 0, 0, 1.0, 0, 0],  # an axis-aligned plane: its normal is z
            [3.0, 0, 0, 0, 0, 0],  # an axis-aligned line: any vector normal to x
            [0.0, 0, 0, 0, 0, 0],  # all points in one place: any unit vector
            [1.0, 0, 0, 1.0, 0, 1.0],  # isotropic: any unit vector
            [1.0, 1.0, 0, 1.0, 0, 0],  # rows exactly parallel, a line along (1, 1, 0)
        ]
    )
    got = smallest_eigenvectors(cases)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(np.abs(got[0]), [0, 0, 1], atol=1e-12)
    assert abs(got[1, 0]) < 1e-12
    assert abs(got[4] @ [1, 1, 0]) < 1e-12


def test_neighbourhood_covariances_match_numpy_far_from_the_origin():
    rng = np.random.default_rng(1)
    points = rng.normal(scale=0.01, size=(500, 3)) + 1e3  # far out: no precision lost
    neighbours = rng.integers(0, 500, size=(500, 12))
    expected = np.stack([np.cov(points[row].T, bias=True) for row in neighbours])
    np.testing.assert_allclose(
        full(neighbourhood_covariances(points, neighbours)), expected, rtol=1e-9, atol=1e-14
    )


@pytest.mark.parametrize("k", [3, 16, 64])
def test_pca_normals_of_a_tilted_plane(k):
    rng = np.random.default_rng(2)
    normal = np.array([1.0, -2.0, 0.5]) / np.linalg.norm([1.0, -2.0, 0.5])
    u = np.cross(normal, [0, 0, 1.0])
    u /= np.linalg.norm(u)
    v = np.cross(normal, u)
    st = rng.uniform(-1, 1, size=(200, 2))
    points = st[:, :1] * u + st[:, 1:] * v + 5.0
    neighbours = np.stack([rng.choice(200, k, replace=False) for _ in range(200)])
    got = pca_normals(points, neighbours)
    np.testing.assert_allclose(np.abs(got @ normal), 1.0, atol=1e-12)
