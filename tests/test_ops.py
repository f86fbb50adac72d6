"""Correctness of the compiled op against the pure-PyTorch reference, on CPU and (if present) CUDA.

Layers: forward values and neighbours; vector-Jacobian products through all three outputs;
second order (an Eikonal loss on normalised features); float64 gradcheck/gradgradcheck;
opcheck of the registrations; bad inputs; the ``idx=`` path; CUDA against CPU.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from neusdf.ops import (
    SEARCH_METHODS,
    KnnAggregateResult,
    knn_aggregate_aniso,
    knn_aggregate_aniso_reference,
    knn_search_aniso,
    knn_search_aniso_reference,
)
from neusdf.ops.knn import ensure_registered
from neusdf.ops.reference import anisotropic_dists, euclidean_metric
from neusdf.ops.testing import SEARCH_CASES, make_inputs, make_search_case

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, CUDA])]
DTYPES = [torch.float32, torch.float64]

# (B, Q, P, F, K) and input options: K = 1, K = P, F not a multiple of 32, B = 3, Q = 1,
# strongly anisotropic precisions, non-orthonormal R, K > 32 (the CUDA general path).
CASES = [
    pytest.param((2, 40, 30, 8, 4), {}, id="basic"),
    pytest.param((1, 17, 12, 5, 1), {}, id="K=1"),
    pytest.param((2, 9, 7, 3, 7), {}, id="K=P"),
    pytest.param((3, 25, 40, 33, 6), {}, id="B=3-F=33"),
    pytest.param((2, 1, 20, 4, 5), {}, id="Q=1"),
    pytest.param((1, 50, 60, 16, 8), {"anisotropy": 100.0}, id="anisotropic"),
    pytest.param((2, 30, 25, 6, 5), {"orthonormal": False}, id="R-not-orthonormal"),
    pytest.param((1, 20, 300, 70, 16), {}, id="P>tile-F=70"),
    pytest.param((1, 12, 60, 4, 40), {}, id="K=40"),
]

RTOL = {torch.float32: 2e-4, torch.float64: 1e-9}


def tol(dtype: torch.dtype) -> dict:
    return {"rtol": RTOL[dtype], "atol": RTOL[dtype]}


def assert_close_scaled(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, name: str = ""
) -> None:
    """Elementwise closeness relative to the largest magnitude of the expected tensor."""
    scale = max(float(expected.abs().max()), 1.0)
    torch.testing.assert_close(
        actual,
        expected,
        rtol=RTOL[dtype],
        atol=RTOL[dtype] * scale,
        msg=lambda m: f"{name}: {m}" if name else m,
    )


def assert_same_neighbours(idx, q, p, sigma, R) -> None:
    """idx holds the K smallest distances in ascending order (checked in float64).

    Exactly equal distances may appear in either order, and near-ties may swap in float32:
    the gathered float64 distances must equal the K smallest ones, and the indices must equal
    the reference's wherever the neighbouring distances are separated by more than rounding.
    """
    D = anisotropic_dists(*(t.detach().double().cpu() for t in (q, p, sigma, R)))
    idx = idx.cpu()
    K = idx.shape[-1]
    ref_d, ref_i = torch.sort(D, dim=-1, stable=True)
    ours = torch.gather(D, -1, idx)
    torch.testing.assert_close(ours, ref_d[..., :K], rtol=1e-5, atol=1e-6)
    gaps = ref_d[..., 1:] - ref_d[..., :-1]
    big = torch.full_like(ref_d[..., :1], float("inf"))
    before = torch.cat([big, gaps], -1)[..., :K]
    after = torch.cat([gaps, big], -1)[..., :K]
    clear = torch.minimum(before, after) > 1e-4 * (1 + ref_d[..., :K].abs())
    assert torch.equal(idx[clear], ref_i[..., :K][clear])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("size", "opts"), CASES)
def test_forward_matches_reference(size, opts, dtype, device):
    B, Q, P, F, K = size
    q, p, f, sigma, R = make_inputs(B, Q, P, F, dtype=dtype, device=device, seed=1, **opts)
    f_out, w, dists, idx = knn_aggregate_aniso(q, p, f, sigma, R, K)
    assert f_out.shape == (B, Q, F) and w.shape == dists.shape == idx.shape == (B, Q, K)
    assert idx.dtype == torch.int64 and f_out.dtype == dtype and f_out.device == q.device
    assert_same_neighbours(idx, q, p, sigma, R)
    # Values on the same neighbours (the reference re-evaluated on our idx).
    r_out, r_w, r_d, _ = knn_aggregate_aniso_reference(q, p, f, sigma, R, K, idx=idx)
    assert_close_scaled(dists, r_d, dtype)
    assert_close_scaled(w, r_w, dtype)
    assert_close_scaled(f_out, r_out, dtype)
    assert bool((dists[..., 1:] >= dists[..., :-1]).all())


def _vjp(fn, inputs, K, upstream):
    """Gradients of sum(out * upstream) over the outputs whose upstream is not None."""
    outs = fn(*inputs, K)[:3]
    used = [(o, g) for o, g in zip(outs, upstream, strict=True) if g is not None]
    return torch.autograd.grad(
        [o for o, _ in used],
        inputs,
        [g for _, g in used],
        allow_unused=True,
        materialize_grads=True,
    )


# Which outputs carry an upstream gradient: all three, or one alone (the others then reach the
# backward as None and their terms are skipped).
USES = [(True, True, True), (True, False, False), (False, True, False), (False, False, True)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("size", "opts"), CASES[:8])
@pytest.mark.parametrize("uses", USES, ids=["all", "f_out", "w", "dists"])
def test_first_order_matches_reference(size, opts, dtype, device, uses):
    B, Q, P, F, K = size
    inputs = make_inputs(B, Q, P, F, dtype=dtype, device=device, seed=2, requires_grad=True, **opts)
    idx = knn_search_aniso(*inputs[:2], *inputs[3:], K)
    g = torch.Generator().manual_seed(3)
    upstream = [
        torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
        if use
        else None
        for shape, use in zip(((B, Q, F), (B, Q, K), (B, Q, K)), uses, strict=True)
    ]
    ours = _vjp(lambda *a: knn_aggregate_aniso(*a, idx=idx), inputs, K, upstream)
    ref = _vjp(lambda *a: knn_aggregate_aniso_reference(*a, idx=idx), inputs, K, upstream)
    for name, a, b in zip(("q", "p", "f", "sigma", "R"), ours, ref, strict=True):
        assert_close_scaled(a, b, dtype, name)


def eikonal_grads(fn, inputs, K, features_only=False):
    """Gradients of an Eikonal + surface loss on normalised features w.r.t. all five inputs.

    With features_only the SDF reads f_out alone (w and dists get no upstream gradient).
    """
    q = inputs[0]
    f_out, w, dists, _ = fn(*inputs, K)
    head = torch.linspace(-1.0, 1.0, f_out.shape[-1], dtype=q.dtype, device=q.device)
    if features_only:
        sdf = (f_out * head).sum(-1)
    else:
        wsum = w.sum(-1, keepdim=True)
        feat = f_out / (wsum + 1e-2)
        sdf = (feat * head).sum(-1) + 0.5 * wsum[..., 0] - 0.05 * dists[..., 0]
    (grad_q,) = torch.autograd.grad(sdf.sum(), q, create_graph=True)
    loss = ((grad_q.norm(dim=-1) - 1) ** 2).mean() + sdf.abs().mean()
    return torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("size", "opts"), CASES[:8])
@pytest.mark.parametrize("features_only", [False, True], ids=["all-outputs", "f_out-only"])
def test_second_order_eikonal_matches_reference(size, opts, dtype, device, features_only):
    B, Q, P, F, K = size
    inputs = make_inputs(B, Q, P, F, dtype=dtype, device=device, seed=4, requires_grad=True, **opts)
    idx = knn_search_aniso(*inputs[:2], *inputs[3:], K)
    ours = eikonal_grads(lambda *a: knn_aggregate_aniso(*a, idx=idx), inputs, K, features_only)
    ref = eikonal_grads(
        lambda *a: knn_aggregate_aniso_reference(*a, idx=idx), inputs, K, features_only
    )
    for a, b in zip(ours, ref, strict=True):
        assert_close_scaled(a, b, dtype)


def test_gradcheck_and_gradgradcheck_float64_cpu():
    inputs = make_inputs(2, 6, 9, 3, dtype=torch.float64, seed=5, requires_grad=True)

    def fn(q, p, f, sigma, R):
        return knn_aggregate_aniso(q, p, f, sigma, R, 3)[:3]

    assert torch.autograd.gradcheck(fn, inputs)
    # Upstreams for every output of the backward: both the fast (query) path and the exact
    # gathered path for the point gradients are checked.
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.cuda
@CUDA
def test_gradcheck_float64_cuda():
    inputs = make_inputs(1, 5, 8, 3, dtype=torch.float64, device="cuda", seed=6, requires_grad=True)

    def fn(q, p, f, sigma, R):
        return knn_aggregate_aniso(q, p, f, sigma, R, 3)[:3]

    assert torch.autograd.gradcheck(fn, inputs, nondet_tol=1e-10)
    assert torch.autograd.gradgradcheck(fn, inputs, nondet_tol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    ensure_registered()
    B, Q, P, F, K = 2, 7, 6, 5, 3
    q, p, f, sigma, R = make_inputs(B, Q, P, F, dtype=torch.float64, device=device, seed=7)
    ops = torch.ops.neusdf
    idx = ops.knn_search(q, p, sigma, R, K)
    # Upstreams: gf (B, Q, F), gw and gd (B, Q, K), ggq (B, Q, 3).
    gf, gw, gd = (
        torch.randn(shape, dtype=q.dtype, device=device)
        for shape in ((B, Q, F), (B, Q, K), (B, Q, K))
    )
    ggq = torch.randn_like(q)
    torch.library.opcheck(ops.knn_search, (q, p, sigma, R, K))
    torch.library.opcheck(ops.knn_search, (q, p, None, None, K))  # the Euclidean metric
    torch.library.opcheck(ops.knn_search_ordered, (q, p, sigma, R, K))
    torch.library.opcheck(ops.knn_search_ordered, (q, p, None, None, K, "brute"))
    order = torch.randperm(B * Q, device=device)
    leaves = [t.clone().requires_grad_() for t in (q, p, f, sigma, R)]
    torch.library.opcheck(ops.knn_aggregate, (*leaves, idx))
    torch.library.opcheck(ops.knn_aggregate, (*leaves, idx, order))
    torch.library.opcheck(ops.knn_aggregate_backward, (gf, gw, gd, *leaves, idx))
    torch.library.opcheck(ops.knn_aggregate_backward, (gf, None, None, *leaves, idx, order))
    for upstream in ((gf, gw, gd), (gf, None, None), (None, gw, None)):
        args = (ggq, *upstream, q, p, f, sigma, R, idx)
        torch.library.opcheck(ops.knn_aggregate_double_backward, args)
        torch.library.opcheck(ops.knn_aggregate_double_backward, (*args, order))


def test_result_is_a_named_tuple():
    q, p, f, sigma, R = make_inputs(1, 6, 8, 3, seed=20)
    for fn in (knn_aggregate_aniso, knn_aggregate_aniso_reference):
        res = fn(q, p, f, sigma, R, 3)
        assert isinstance(res, KnnAggregateResult)
        f_out, w, dists, idx = res
        assert res.f_out is f_out and res.w is w and res.dists is dists and res.idx is idx


@pytest.mark.parametrize("device", DEVICES)
def test_fake_kernels_match_real_outputs(device):
    """Shapes, dtypes and strides of every output: fake (meta) kernels against the real ones,
    with non-contiguous inputs (the kernels return fresh contiguous tensors)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    ensure_registered()
    B, Q, P, F, K = 2, 5, 7, 4, 3
    q, p, f, sigma, R = make_inputs(B, Q, P, F, dtype=torch.float64, device=device, seed=21)
    qn = q.transpose(1, 2).contiguous().transpose(1, 2)
    Rn = R.transpose(2, 3).contiguous().transpose(2, 3)
    fn = torch.stack([f, f], -1)[..., 0]
    ops = torch.ops.neusdf
    idx = ops.knn_search(qn, p, sigma, Rn, K)
    shapes = ((B, Q, F), (B, Q, K), (B, Q, K))
    gf, gw, gd = (torch.randn(s, dtype=q.dtype, device=device) for s in shapes)
    calls = [
        (ops.knn_search, (qn, p, sigma, Rn, K)),
        (ops.knn_search_ordered, (qn, p, sigma, Rn, K)),
        (ops.knn_aggregate, (qn, p, fn, sigma, Rn, idx)),
        (ops.knn_aggregate, (qn, p, fn, sigma, Rn, idx, torch.randperm(B * Q, device=device))),
        (ops.knn_aggregate_backward, (gf, gw, gd, qn, p, fn, sigma, Rn, idx)),
        (ops.knn_aggregate_double_backward, (qn, gf, None, gd, qn, p, fn, sigma, Rn, idx)),
    ]
    for op, args in calls:
        real = op(*args)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
            fake = op(*fake_args)
        real = real if isinstance(real, tuple) else (real,)
        fake = fake if isinstance(fake, tuple) else (fake,)
        for r, x in zip(real, fake, strict=True):
            assert (r.shape, r.dtype, r.stride()) == (x.shape, x.dtype, x.stride()), op


def test_torch_compile_fullgraph_cpu():
    """The op traces into one graph (fake kernels, no graph break) and the compiled function
    gives the eager values and first-order gradients. (A double backward through a compiled
    graph is a limitation of torch.compile's aot_autograd, not of the op.)"""
    inputs = make_inputs(2, 9, 12, 4, dtype=torch.float64, seed=22, requires_grad=True)
    K = 3

    def step(q, p, f, sigma, R):
        f_out, w, dists, idx = knn_aggregate_aniso(q, p, f, sigma, R, K)
        return f_out.sum(-1) + w.sum(-1) - dists[..., 0], idx

    def run(fn):
        s, idx = fn(*inputs)
        return s, idx, torch.autograd.grad(s.sum(), inputs)

    expected = run(step)  # also loads the library before tracing
    got = run(torch.compile(step, fullgraph=True))
    torch.testing.assert_close(got[0], expected[0])
    assert torch.equal(got[1], expected[1])
    for a, b in zip(got[2], expected[2], strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
@pytest.mark.parametrize("check_values", [None, True])
def test_nonpositive_sigma_is_rejected(bad, check_values):
    """On the CPU the values are checked by default (no synchronisation to pay)."""
    q, p, f, sigma, R = make_inputs(1, 5, 8, 3, seed=23)
    sigma[0, 4, 1] = bad
    with pytest.raises(ValueError, match=r"sigma must be > 0 everywhere"):
        knn_aggregate_aniso(q, p, f, sigma, R, 3, check_values=check_values)
    with pytest.raises(ValueError, match=r"sigma must be > 0 everywhere"):
        knn_search_aniso(q, p, sigma, R, 3, check_values=check_values)


@CUDA
@pytest.mark.cuda
def test_cuda_values_are_checked_only_when_asked():
    """On CUDA the check costs a device synchronisation: off by default, on when asked."""
    q, p, f, sigma, R = make_inputs(1, 5, 8, 3, device="cuda", seed=23)
    sigma[0, 4, 1] = -1.0
    idx = knn_search_aniso(q, p, sigma, R, 3)
    knn_aggregate_aniso(q, p, f, sigma, R, 3, idx=idx)
    with pytest.raises(ValueError, match=r"sigma must be > 0 everywhere"):
        knn_aggregate_aniso(q, p, f, sigma, R, 3, check_values=True)
    with pytest.raises(ValueError, match=r"sigma must be > 0 everywhere"):
        knn_search_aniso(q, p, sigma, R, 3, check_values=True)


def test_check_values_must_be_a_bool_or_none():
    q, p, f, sigma, R = make_inputs(1, 5, 8, 3, seed=23)
    with pytest.raises(TypeError, match=r"check_values must be True, False or None, got 'yes'"):
        knn_search_aniso(q, p, sigma, R, 3, check_values="yes")


@pytest.mark.parametrize("device", DEVICES)
def test_unchecked_bad_idx_gives_nan_rows(device):
    q, p, f, sigma, R = make_inputs(1, 5, 8, 3, device=device, seed=25)
    idx = knn_search_aniso(q, p, sigma, R, 3)
    idx[0, 2, 1] = 8
    f_out, w, dists, _ = knn_aggregate_aniso(q, p, f, sigma, R, 3, idx=idx, check_values=False)
    assert torch.isnan(f_out[0, 2]).all()
    assert torch.isnan(w[0, 2, 1]) and torch.isnan(dists[0, 2, 1])
    rows = [0, 1, 3, 4]
    assert torch.isfinite(f_out[0, rows]).all() and torch.isfinite(w[0, rows]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_idx_path_equals_search_path(device):
    inputs = make_inputs(2, 20, 15, 5, device=device, seed=8, requires_grad=True)
    a = knn_aggregate_aniso(*inputs, 4)
    b = knn_aggregate_aniso(*inputs, 4, idx=a[3])
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    ga = eikonal_grads(knn_aggregate_aniso, inputs, 4)
    gb = eikonal_grads(lambda *t: knn_aggregate_aniso(*t, idx=a[3]), inputs, 4)
    for x, y in zip(ga, gb, strict=True):
        if device == "cpu":  # CUDA scatters with atomics: equal up to summation order
            assert torch.equal(x, y)
        else:
            torch.testing.assert_close(x, y)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_go_to_the_lower_index(device, dtype):
    q, p, f, sigma, R = make_inputs(1, 8, 12, 2, dtype=dtype, device=device, seed=9)
    # Points 3, 7 and 10 are copies of point 1 (same position, precisions and axes).
    for j in (3, 7, 10):
        p[:, j], sigma[:, j], R[:, j] = p[:, 1], sigma[:, 1], R[:, 1]
    q[:, 0] = p[:, 1, :]  # query 0 sits on the four copies: distance 0 for each
    idx = knn_search_aniso(q, p, sigma, R, 3)
    assert idx[0, 0].tolist() == [1, 3, 7]
    assert_same_neighbours(idx, q, p, sigma, R)


# (B, Q, P, K): a grid of several cells per axis, K == P, K == 1.
GRID_SIZES = [(2, 300, 3000, 16), (1, 64, 32, 32), (1, 150, 1500, 1)]
PRUNING_METHODS = ("grid", "tile")  # the exact searches that skip points by a bound


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", SEARCH_CASES)
@pytest.mark.parametrize("method", PRUNING_METHODS)
def test_pruning_search_equals_brute_force(method, kind, dtype, device):
    """The grid and tile searches are exact: the same indices in the same order as brute force
    (ties to the lower index), on inputs built to break a careless bound."""
    for B, Q, P, K in GRID_SIZES:
        q, p, sigma, R = make_search_case(kind, B, Q, P, dtype=dtype, device=device, seed=5)
        brute = knn_search_aniso(q, p, sigma, R, K, method="brute")
        got = knn_search_aniso(q, p, sigma, R, K, method=method)
        assert torch.equal(got, brute), (kind, B, Q, P, K, int((got != brute).sum()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["needles", "pancakes", "clusters"])
def test_grid_search_with_a_sampled_median(kind, device):
    """Above 4096 points the grid takes the median lam of a sample (every ceil(P / 4096)-th
    point) to decide which points every query scans; the result stays exact, also with
    needles far below the median that fall between the sampled points."""
    q, p, sigma, R = make_search_case(kind, 2, 200, 9001, device=device, seed=21)
    for K in (1, 7):
        brute = knn_search_aniso(q, p, sigma, R, K, method="brute")
        assert torch.equal(knn_search_aniso(q, p, sigma, R, K, method="grid"), brute), (kind, K)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", PRUNING_METHODS)
def test_pruning_search_many_seeds(method, device):
    for seed in range(12):
        kind = SEARCH_CASES[seed % len(SEARCH_CASES)]
        q, p, sigma, R = make_search_case(kind, 1, 100, 900, device=device, seed=100 + seed)
        brute = knn_search_aniso(q, p, sigma, R, 6, method="brute")
        assert torch.equal(knn_search_aniso(q, p, sigma, R, 6, method=method), brute), kind


@pytest.mark.parametrize("device", DEVICES)
def test_grid_search_brute_force_is_right(device):
    """The brute force the grid is compared with agrees with float64 distances."""
    q, p, sigma, R = make_search_case("clusters", 1, 200, 2000, device=device, seed=6)
    idx = knn_search_aniso(q, p, sigma, R, 8, method="grid")
    assert_same_neighbours(idx, q, p, sigma, R)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", PRUNING_METHODS)
def test_pruning_search_non_finite_inputs(method, device):
    """NaN queries and points with non-finite positions or axes: the same result as brute
    force (the grid keeps such points in the bucket every query scans, a tile holding one is
    never skipped; NaN queries scan everything)."""
    q, p, sigma, R = make_search_case("clusters", 1, 60, 1200, device=device, seed=7)
    q[0, 3] = float("nan")
    q[0, 4, 1] = float("inf")
    p[0, 10] = float("nan")
    p[0, 11, 2] = float("inf")
    R[0, 12, 1, 1] = float("nan")
    sigma[0, 13] = float("inf")
    brute = knn_search_aniso(q, p, sigma, R, 5, method="brute")
    assert torch.equal(knn_search_aniso(q, p, sigma, R, 5, method=method), brute)
    assert brute[0, 3].tolist() == [0, 1, 2, 3, 4]  # all keys equal (NaN): lowest indices


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", PRUNING_METHODS)
def test_pruning_search_queries_where_the_squared_gap_overflows(method, device):
    """Queries 3e19 away in float32 with precisions near 1e-30: |q - p|^2 overflows while the
    distances (about 1e9) do not. A bound must read the overflowed gap as "at least the largest
    float", not as infinity, or it skips tiles and cells that hold the nearest points."""
    q, p, sigma, R = make_search_case("clusters", 1, 100, 1500, device=device, seed=31)
    sigma = sigma * 1e-30
    q = q.clone()
    q[..., 0] = 3e19
    brute = knn_search_aniso(q, p, sigma, R, 6, method="brute")
    keys = anisotropic_dists(q.double(), p.double(), sigma.double(), R.double())
    assert torch.isfinite(keys).all() and keys.max() < 1e30  # a real distance, not an overflow
    got = knn_search_aniso(q, p, sigma, R, 6, method=method)
    assert torch.equal(got, brute), int((got != brute).sum())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", PRUNING_METHODS)
def test_unchecked_nonpositive_sigma_search_stays_exact(method, device):
    """Unchecked sigma <= 0 or NaN: the pruning searches scan such points for every query and
    return brute force's neighbours; a negative precision's D is below zero and sorts first,
    as the formula says."""
    q, p, sigma, R = make_search_case("clusters", 1, 80, 1200, device=device, seed=24)
    sigma[0, 7] = 0.0
    sigma[0, 8, 2] = -1e6
    sigma[0, 9, 0] = float("nan")
    brute = knn_search_aniso(q, p, sigma, R, 6, method="brute", check_values=False)
    got = knn_search_aniso(q, p, sigma, R, 6, method=method, check_values=False)
    assert torch.equal(got, brute), int((got != brute).sum())
    dists = anisotropic_dists(q.double(), p.double(), sigma.double(), R.double())
    assert_same_neighbours(brute, q, p, sigma, R)
    negative = dists[0, :, 8] < 0
    assert negative.any()
    assert (brute[0, negative, 0] == 8).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_euclidean_search_equals_identity_metric(dtype, device):
    """sigma = R = None is the Euclidean metric: bit for bit the neighbours of sigma = 1 and
    R = I, for every method and list size (CUDA's brute force has its own kernel for it, the
    grid and K > 32 run the general ones), with ties, duplicates and non-finite inputs."""
    kinds = ("clusters", "duplicates", "flat", "one-point-repeated", "far-queries")
    cases = [
        make_search_case(kind, 2, 150, 1100, dtype=dtype, device=device, seed=41)[:2]
        for kind in kinds
    ]
    q, p = make_search_case("clusters", 1, 60, 900, dtype=dtype, device=device, seed=42)[:2]
    q[0, 3] = float("nan")
    q[0, 4, 1] = float("inf")
    p[0, 10] = float("nan")
    p[0, 11, 2] = float("inf")
    cases.append((q, p))
    for q, p in cases:
        sigma, R = euclidean_metric(p)
        for K in (1, 5, 16, 33):
            for method in SEARCH_METHODS:
                if method in PRUNING_METHODS and device == "cuda" and K > 32:
                    continue
                want = knn_search_aniso(q, p, sigma, R, K, method=method)
                got = knn_search_aniso(q, p, None, None, K, method=method)
                assert torch.equal(got, want), (K, method, int((got != want).sum()))


def test_euclidean_search_needs_both_or_neither():
    q, p, _, sigma, R = make_inputs(1, 5, 8, 1, seed=43)
    with pytest.raises(ValueError, match=r"pass sigma and R together, or neither"):
        knn_search_aniso(q, p, sigma, None, 3)
    with pytest.raises(ValueError, match=r"pass sigma and R together, or neither"):
        knn_search_aniso(q, p, None, R, 3)
    ref = knn_search_aniso_reference(q.double(), p.double(), None, None, 3)
    assert torch.equal(knn_search_aniso(q.double(), p.double(), None, None, 3), ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", PRUNING_METHODS)
def test_aggregate_search_argument(method, device):
    inputs = make_inputs(1, 40, 2000, 4, device=device, seed=24)
    a = knn_aggregate_aniso(*inputs, 8, search=method)
    b = knn_aggregate_aniso(*inputs, 8, search="brute")
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_queries_and_noncontiguous_inputs(device):
    q, p, f, sigma, R = make_inputs(2, 10, 12, 6, device=device, seed=10)
    out = knn_aggregate_aniso(q[:, :0], p, f, sigma, R, 3)
    assert [tuple(t.shape) for t in out] == [(2, 0, 6), (2, 0, 3), (2, 0, 3), (2, 0, 3)]
    # Non-contiguous views: transposed storage and strided slices.
    qn = q.transpose(1, 2).contiguous().transpose(1, 2)
    fn = torch.stack([f, f], -1)[..., 0]
    Rn = R.transpose(2, 3).contiguous().transpose(2, 3)
    assert not (qn.is_contiguous() or fn.is_contiguous() or Rn.is_contiguous())
    a = knn_aggregate_aniso(qn, p, fn, sigma, Rn, 3)
    b = knn_aggregate_aniso(q, p, f, sigma, R, 3)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("device", DEVICES)
def test_nan_inputs_do_not_crash_or_leak(device):
    q, p, f, sigma, R = make_inputs(1, 10, 12, 4, device=device, seed=11)
    q[0, 2] = float("nan")  # a NaN query: its distances are NaN, sorted last
    p[0, 5] = float("nan")  # a NaN point: never preferred over a finite one
    f_out, w, dists, idx = knn_aggregate_aniso(q, p, f, sigma, R, 4)
    assert bool(((idx >= 0) & (idx < 12)).all())
    assert not bool((idx[0, [0, 1, 3, 4]] == 5).any())
    assert bool(torch.isnan(f_out[0, 2]).all())
    others = [i for i in range(10) if i != 2]
    assert bool(torch.isfinite(f_out[0, others]).all())


def test_third_order_raises():
    inputs = make_inputs(1, 5, 6, 2, dtype=torch.float64, seed=12, requires_grad=True)
    f_out, _, _, _ = knn_aggregate_aniso(*inputs, 2)
    (gq,) = torch.autograd.grad(f_out.sum(), inputs[0], create_graph=True)
    (ggf,) = torch.autograd.grad(gq.square().sum(), inputs[2], create_graph=True)
    with pytest.raises(RuntimeError, match="third-order"):
        torch.autograd.grad(ggf.sum(), inputs[0])


BAD_INPUTS = [
    (dict(q=torch.zeros(2, 5, 2)), ValueError, r"q must have shape \(B, Q, 3\)"),
    (dict(q=torch.zeros(5, 3)), ValueError, r"q must have shape"),
    (dict(p=torch.zeros(3, 8, 3)), ValueError, r"p has batch size 3 but q has 2"),
    (dict(f=torch.zeros(2, 7, 4)), ValueError, r"f must have shape \(B, P, F\)"),
    (dict(sigma=torch.ones(2, 7, 3)), ValueError, r"sigma must have \(B, P\) = \(2, 8\)"),
    (dict(R=torch.zeros(2, 8, 3)), ValueError, r"R must have shape \(B, P, 3, 3\)"),
    (dict(K=0), ValueError, r"K must satisfy 1 <= K <= P = 8, got K = 0"),
    (dict(K=9), ValueError, r"K must satisfy 1 <= K <= P = 8, got K = 9"),
    (dict(K=2.0), TypeError, r"K must be an int"),
    (dict(q=torch.zeros(2, 5, 3, dtype=torch.int64)), TypeError, r"q must be float32 or float64"),
    (dict(f=torch.zeros(2, 8, 4, dtype=torch.float64)), TypeError, r"f has dtype torch.float64"),
    (dict(q=torch.zeros(2, 5, 3).tolist()), TypeError, r"q must be a torch.Tensor, got list"),
    (dict(idx=torch.zeros(2, 5, 3, dtype=torch.int32)), TypeError, r"idx must be int64"),
    (dict(idx=torch.zeros(2, 5, 2, dtype=torch.int64)), ValueError, r"idx must have shape"),
    (
        dict(idx=torch.full((2, 5, 3), 8)),
        ValueError,
        r"idx must hold point indices in \[0, P\) = \[0, 8\)",
    ),
    (dict(idx=torch.full((2, 5, 3), -1)), ValueError, r"idx must hold point indices"),
    (dict(search="kd-tree"), ValueError, r"search method must be one of"),
]


@pytest.mark.parametrize(("changes", "error", "message"), BAD_INPUTS)
def test_bad_inputs_get_clear_errors(changes, error, message):
    args = dict(zip(("q", "p", "f", "sigma", "R"), make_inputs(2, 5, 8, 4, seed=13), strict=True))
    args["K"] = 3
    args.update(changes)
    with pytest.raises(error, match=message):
        knn_aggregate_aniso(**args)


@pytest.mark.cuda
@CUDA
def test_mixed_devices_get_a_clear_error():
    q, p, f, sigma, R = make_inputs(1, 5, 8, 4, seed=14)
    with pytest.raises(ValueError, match=r"p is on cuda:0 but q is on cpu"):
        knn_aggregate_aniso(q, p.cuda(), f, sigma, R, 3)


def test_direct_op_call_checks_inputs():
    ensure_registered()
    q, p, f, sigma, R = make_inputs(1, 5, 8, 4, seed=15)
    with pytest.raises(RuntimeError, match=r"K must satisfy 1 <= K <= P"):
        torch.ops.neusdf.knn_search(q, p, sigma, R, 9)
    with pytest.raises(RuntimeError, match=r"sigma must be \(B, P, 3\)"):
        torch.ops.neusdf.knn_search(q, p, sigma[:, :4], R, 2)
    with pytest.raises(RuntimeError, match=r"method must be"):
        torch.ops.neusdf.knn_search(q, p, sigma, R, 2, "kd-tree")
    with pytest.raises(RuntimeError, match=r"pass sigma and R together, or neither"):
        torch.ops.neusdf.knn_search(q, p, sigma, None, 2)


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("size", "opts"), CASES)
def test_cuda_matches_cpu(size, opts, dtype):
    B, Q, P, F, K = size
    cpu = make_inputs(B, Q, P, F, dtype=dtype, seed=16, requires_grad=True, **opts)
    gpu = [t.detach().cuda().requires_grad_() for t in cpu]
    a = knn_aggregate_aniso(*cpu, K)
    b = knn_aggregate_aniso(*gpu, K)
    if dtype == torch.float64:
        assert torch.equal(a[3], b[3].cpu())
    for x, y in zip(a[:3], b[:3], strict=True):
        assert_close_scaled(y.cpu(), x, dtype)
    ga = eikonal_grads(lambda *t: knn_aggregate_aniso(*t, idx=a[3]), cpu, K)
    gb = eikonal_grads(lambda *t: knn_aggregate_aniso(*t, idx=a[3].cuda()), gpu, K)
    for x, y in zip(ga, gb, strict=True):
        assert_close_scaled(y.cpu(), x, dtype)


# (Q, F, K) for the CUDA kernels' layouts of a warp: several queries a warp (K <= 16) or one
# (K = 32) or rounds of 32 neighbours (K > 32); feature rows of whole 16-byte loads (float
# F % 4 == 0, double F % 2 == 0), of single channels (F odd), narrower or wider than a warp; Q
# leaving the last warp's queries empty.
AGGREGATE_LAYOUTS = [
    (37, 1, 1),
    (37, 3, 3),
    (21, 4, 8),
    (19, 12, 16),
    (13, 64, 16),
    (11, 70, 32),
    (9, 130, 33),
    (5, 2, 64),
    (7, 256, 5),
]


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("Q", "F", "K"), AGGREGATE_LAYOUTS)
def test_cuda_aggregate_layouts(Q, F, K, dtype):
    """Forward values and the gradients of all three outputs against the reference."""
    inputs = make_inputs(2, Q, 80, F, dtype=dtype, device="cuda", seed=Q + F + K)
    idx = knn_search_aniso(*(inputs[i] for i in (0, 1, 3, 4)), K)
    cpu = [t.detach().cpu().requires_grad_() for t in inputs]
    expected = knn_aggregate_aniso_reference(*cpu, K, idx=idx.cpu())[:3]
    gen = torch.Generator().manual_seed(Q)
    upstream = [torch.randn(t.shape, generator=gen, dtype=dtype) for t in expected]
    expected_grads = torch.autograd.grad(expected, cpu, upstream)
    # The same features stored one element past a 16-byte boundary: single-channel loads.
    storage = torch.empty(inputs[2].numel() + 1, dtype=dtype, device="cuda")
    shifted = storage[1:].view_as(inputs[2]).copy_(inputs[2])
    assert shifted.is_contiguous() and shifted.data_ptr() % 16 != 0
    for features in (inputs[2], shifted):
        leaves = [t.detach().requires_grad_() for t in (*inputs[:2], features, *inputs[3:])]
        outputs = knn_aggregate_aniso(*leaves, K, idx=idx)[:3]
        for name, x, y in zip(("f_out", "w", "dists"), outputs, expected, strict=True):
            assert_close_scaled(x.detach().cpu(), y.detach(), dtype, name)
        grads = torch.autograd.grad(outputs, leaves, [g.cuda() for g in upstream])
        for name, x, y in zip("q p f sigma R".split(), grads, expected_grads, strict=True):
            assert_close_scaled(x.cpu(), y, dtype, f"grad {name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("method", "K"), [("auto", 8), ("brute", 8), ("grid", 8), ("tile", 8), ("brute", 40)]
)
def test_search_ordered_is_the_search_with_a_query_order(method, K, device):
    """knn_search_ordered returns knn_search's idx and a permutation of the flat queries: the
    tile search's Morton order on CUDA, the identity for brute force and on the CPU."""
    ensure_registered()
    q, p, _, sigma, R = make_inputs(2, 3000, 1200, 1, device=device, seed=31)
    idx, order = torch.ops.neusdf.knn_search_ordered(q, p, sigma, R, K, method)
    assert torch.equal(idx, torch.ops.neusdf.knn_search(q, p, sigma, R, K, method))
    assert order.dtype == torch.int64 and order.shape == (2 * 3000,)
    identity = torch.arange(2 * 3000, device=device)
    assert torch.equal(order.sort().values, identity)
    sorts_queries = device == "cuda" and method in ("grid", "tile")
    assert torch.equal(order, identity) != sorts_queries
    if sorts_queries:  # neighbours in the order are neighbours in space
        flat = q.reshape(-1, 3)
        steps = (flat[order[1:]] - flat[order[:-1]]).norm(dim=-1).median()
        assert steps < 0.5 * (flat[1:] - flat[:-1]).norm(dim=-1).median()


# The layouts of the aggregation kernels' shared-query path (row lanes <= K slots) and of the
# path where a group of row lanes spans several queries (F large against K), float and double.
ORDER_LAYOUTS = [(2, 30, 64, 16), (3, 37, 64, 4), (1, 33, 5, 3), (2, 21, 130, 40)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("B", "Q", "F", "K"), ORDER_LAYOUTS)
def test_visiting_order_changes_no_result(B, Q, F, K, dtype, device):
    """The aggregation operators visit the queries in any given order with the same results:
    the forward bit for bit (each query's sums run in the same order), the gradients up to the
    order of their atomic additions."""
    ensure_registered()
    q, p, f, sigma, R = make_inputs(B, Q, 50, F, dtype=dtype, device=device, seed=Q + F)
    idx = torch.ops.neusdf.knn_search(q, p, sigma, R, K)
    order = torch.randperm(B * Q, generator=torch.Generator().manual_seed(K)).to(device)
    gen = torch.Generator().manual_seed(F)
    gf, gw, gD, ggq = (
        torch.randn(shape, generator=gen, dtype=dtype).to(device)
        for shape in ((B, Q, F), (B, Q, K), (B, Q, K), (B, Q, 3))
    )
    ops = torch.ops.neusdf
    plain = ops.knn_aggregate(q, p, f, sigma, R, idx)
    for x, y in zip(ops.knn_aggregate(q, p, f, sigma, R, idx, order), plain, strict=True):
        assert torch.equal(x, y)
    for upstream in ((gf, gw, gD), (gf, None, None), (None, gw, None)):
        got = ops.knn_aggregate_backward(*upstream, q, p, f, sigma, R, idx, order)
        want = ops.knn_aggregate_backward(*upstream, q, p, f, sigma, R, idx)
        for x, y in zip(got, want, strict=True):
            assert_close_scaled(x, y, dtype)
        got = ops.knn_aggregate_double_backward(ggq, *upstream, q, p, f, sigma, R, idx, order)
        want = ops.knn_aggregate_double_backward(ggq, *upstream, q, p, f, sigma, R, idx)
        for x, y in zip(got, want, strict=True):
            assert x.shape == y.shape  # (0,) for the gradient of an absent upstream
            if y.numel():
                assert_close_scaled(x, y, dtype)


@pytest.mark.cuda
@CUDA
def test_cuda_order_values_out_of_range_are_skipped():
    """A visiting order with values outside [0, B * Q) leaves those slots idle (no access out
    of bounds, which the sanitizer run checks); the queries of the other slots are right."""
    ensure_registered()
    q, p, f, sigma, R = make_inputs(2, 40, 50, 8, device="cuda", seed=33)
    idx = torch.ops.neusdf.knn_search(q, p, sigma, R, 4)
    order = torch.arange(80, device="cuda")
    order[[5, 60]] = torch.tensor([-7, 1 << 40], device="cuda")
    kept = torch.ones(80, dtype=torch.bool)
    kept[[5, 60]] = False
    plain = torch.ops.neusdf.knn_aggregate(q, p, f, sigma, R, idx)
    skipped = torch.ops.neusdf.knn_aggregate(q, p, f, sigma, R, idx, order)
    for x, y in zip(skipped, plain, strict=True):
        assert torch.equal(x.reshape(80, -1)[kept.cuda()], y.reshape(80, -1)[kept.cuda()])
    grads = torch.ops.neusdf.knn_aggregate_backward(
        torch.ones_like(plain[0]), None, None, q, p, f, sigma, R, idx, order
    )
    assert all(torch.isfinite(g[..., :1]).any() for g in grads)


@pytest.mark.parametrize("device", DEVICES)
def test_public_order_round_trip(device):
    """knn_search_aniso(..., return_order=True) gives the search's neighbours and order; the
    aggregation with both gives what it gives with the neighbours alone."""
    q, p, f, sigma, R = make_inputs(2, 300, 4096, 8, device=device, seed=35, requires_grad=True)
    idx, order = knn_search_aniso(q, p, sigma, R, 8, method="tile", return_order=True)
    assert torch.equal(idx, knn_search_aniso(q, p, sigma, R, 8))
    assert torch.equal(order, torch.arange(600, device=device)) == (device == "cpu")
    assert torch.equal(order.sort().values, torch.arange(600, device=device))
    with_order = knn_aggregate_aniso(q, p, f, sigma, R, 8, idx=idx, order=order)
    without = knn_aggregate_aniso(q, p, f, sigma, R, 8, idx=idx)
    for x, y in zip(with_order, without, strict=True):
        assert torch.equal(x, y)
    loss = with_order.f_out.square().sum() + with_order.w.sum()
    grads = torch.autograd.grad(loss, (q, p, f, sigma, R))
    loss = without.f_out.square().sum() + without.w.sum()
    for x, y in zip(grads, torch.autograd.grad(loss, (q, p, f, sigma, R)), strict=True):
        assert_close_scaled(x, y, torch.float32)


def test_public_order_gets_clear_errors():
    q, p, f, sigma, R = make_inputs(2, 5, 8, 4, seed=36)
    idx = knn_search_aniso(q, p, sigma, R, 3)
    good = torch.arange(10)
    with pytest.raises(ValueError, match=r"pass it together with idx"):
        knn_aggregate_aniso(q, p, f, sigma, R, 3, order=good)
    with pytest.raises(TypeError, match=r"order must be int64, got torch.int32"):
        knn_aggregate_aniso(q, p, f, sigma, R, 3, idx=idx, order=good.int())
    with pytest.raises(TypeError, match=r"order must be a torch.Tensor or None, got list"):
        knn_aggregate_aniso(q, p, f, sigma, R, 3, idx=idx, order=list(range(10)))
    with pytest.raises(ValueError, match=r"order must have shape \(B \* Q,\) = \(10,\)"):
        knn_aggregate_aniso(q, p, f, sigma, R, 3, idx=idx, order=good.view(2, 5))
    for bad in (torch.tensor([0, 0, 2, 3, 4, 5, 6, 7, 8, 9]), good + 1, good - 1):
        with pytest.raises(ValueError, match=r"order must be a permutation of \[0, B \* Q\)"):
            knn_aggregate_aniso(q, p, f, sigma, R, 3, idx=idx, order=bad)
    # unchecked, the CPU kernels never read it
    knn_aggregate_aniso(q, p, f, sigma, R, 3, idx=idx, order=good + 1, check_values=False)
    with pytest.raises(TypeError, match=r"return_order must be True or False"):
        knn_search_aniso(q, p, sigma, R, 3, return_order=1)


def test_bad_order_gets_clear_errors():
    ensure_registered()
    q, p, f, sigma, R = make_inputs(2, 5, 8, 4, seed=34)
    idx = torch.ops.neusdf.knn_search(q, p, sigma, R, 3)
    ops = torch.ops.neusdf
    for order, message in (
        (torch.arange(10, dtype=torch.int32), r"order must be int64"),
        (torch.arange(9), r"order must have shape \(B \* Q,\) = \(10,\)"),
        (torch.arange(10).view(2, 5), r"order must have shape"),
    ):
        with pytest.raises(RuntimeError, match=message):
            ops.knn_aggregate(q, p, f, sigma, R, idx, order)
        with pytest.raises(RuntimeError, match=message):
            ops.knn_aggregate_backward(q, None, None, q, p, f, sigma, R, idx, order)


@pytest.mark.cuda
@CUDA
def test_cuda_search_matches_reference_at_scale():
    q, p, f, sigma, R = make_inputs(2, 3000, 4096, 8, device="cuda", seed=17)
    for K in (1, 8, 16, 32):
        idx = knn_search_aniso(q, p, sigma, R, K)
        sub = slice(0, 500)  # the float64 check builds a (B, Q, P) matrix on the CPU
        assert_same_neighbours(idx[:, sub], q[:, sub], p, sigma, R)


# Run in a fresh process: the warps per block are read once per process.
_WARPS_CHECK = """
import torch
from neusdf.ops import knn_search_aniso
from neusdf.ops.testing import SEARCH_CASES, make_inputs, make_search_case

q, p, _, sigma, R = make_inputs(2, 700, 5000, 1, device="cuda", seed=19)
cases = [(q, p, sigma, R)]
cases += [make_search_case(kind, 2, 300, 1100, device="cuda", seed=3) for kind in SEARCH_CASES]
for q, p, sigma, R in cases:
    for K in (1, 5, 16, 32):
        brute = knn_search_aniso(q, p, sigma, R, K, method="brute")
        assert torch.equal(brute, knn_search_aniso(q, p, sigma, R, K, method="grid")), K
print("same neighbours")
"""


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("warps", [1, 2, 8])
def test_cuda_brute_force_any_warps_per_block(warps):
    """The CUDA brute force equals the grid however many warps share a query's points (their
    lists bound each other's candidates): several tiles, a padded last tile, ties, duplicates."""
    env = {**os.environ, "NEUSDF_SEARCH_WARPS": str(warps)}
    done = subprocess.run(
        [sys.executable, "-c", _WARPS_CHECK], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "same neighbours" in done.stdout


def assert_tile_search_exact(q, p, sigma, R, Ks) -> None:
    """The tile search's indices equal brute force's, for every K in Ks up to P."""
    for K in Ks:
        if K > p.shape[1]:
            continue
        brute = knn_search_aniso(q, p, sigma, R, K, method="brute")
        assert torch.equal(brute, knn_search_aniso(q, p, sigma, R, K, method="tile")), K


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_tile_search_equals_brute_force(dtype, device):
    """The tile search is exact on the adversarial cases, both metrics, K up to 32, P and Q not
    multiples of a tile (a padded last tile), a group of queries smaller than a warp, many
    batches, every point at one position (one sort cell holding them all), and on CUDA both
    group layouts (2 lanes a query where P <= 4 Q and B Q >= 16384, else 4)."""
    q, p, _, sigma, R = make_inputs(2, 700, 5000, 1, dtype=dtype, device=device, seed=19)
    cases = [(q, p, sigma, R), (q, p, None, None)]  # the Euclidean metric too
    cases.append((q, p[:, :1].expand_as(p), sigma, R))
    sizes = [(2, 300, 1100), (1, 60, 1100), (1, 64, 32), (1, 45, 77), (9, 40, 300)]
    if device == "cuda":  # enough queries for 2 lanes a query
        q, p, _, sigma, R = make_inputs(2, 8200, 5000, 1, dtype=dtype, device=device, seed=20)
        cases += [(q, p, sigma, R), (q, p, None, None)]
        sizes.append((2, 8200, 1100))
    for B, Q, P in sizes:
        cases += [
            make_search_case(kind, B, Q, P, dtype=dtype, device=device, seed=3)
            for kind in SEARCH_CASES
        ]
    for q, p, sigma, R in cases:
        assert_tile_search_exact(q, p, sigma, R, (1, 5, 16, 32))


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_tile_search_many_chunks(dtype):
    """The CUDA tile search equals brute force where a batch has more than 64 chunks of 32 tiles
    (a warp tests the chunks 32 at a time, so three rounds), in the cube and on a sphere with
    queries far inside and outside it (most chunks out of reach)."""
    q, p, _, sigma, R = make_inputs(2, 500, 70000, 1, dtype=dtype, device="cuda", seed=21)
    sphere = torch.nn.functional.normalize(p, dim=-1)
    for points, queries in ((p, q), (sphere, q), (sphere, 3 * q)):
        assert_tile_search_exact(queries, points, sigma, R, (1, 16, 32))


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_tile_search_hands_on_long_walks(dtype):
    """The CUDA tile search equals brute force where groups of queries hand their walks on to
    other warps: points on a sphere (69 chunks of tiles a batch, every point twice, so that
    exact ties can fall in different shares), queries near its centre (every point at about the
    same distance: each group scans nearly every tile, past the hand-off's 64, while the groups
    of queries near the surface finish early and take the shares). 4400 centre queries in
    8-query groups are 550 long walks, more than the hand-off slots of K = 32 (512 in float, 341
    in float64): the rest walk alone (an instrumented build counted 573-584 of the 588 groups
    handing on, or trying to)."""
    q, p, _, sigma, R = make_inputs(1, 4700, 35000, 1, dtype=dtype, device="cuda", seed=22)
    sphere = torch.nn.functional.normalize(p, dim=-1).repeat(1, 2, 1)
    sigma, R = sigma.repeat(1, 2, 1), R.repeat(1, 2, 1, 1)
    queries = torch.cat((0.05 * q[:, :4400], sphere[:, :300] + 0.01 * q[:, 4400:]), dim=1)
    assert_tile_search_exact(queries, sphere, sigma, R, (1, 8, 32))


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_grid_search_at_scale(dtype):
    """The CUDA grid search equals the CUDA brute force at a training-like size, and in float64
    the CPU brute force too."""
    q, p, f, sigma, R = make_inputs(2, 6000, 20000, 1, dtype=dtype, device="cuda", seed=18)
    for K in (1, 8, 16, 32):
        grid = knn_search_aniso(q, p, sigma, R, K, method="grid")
        assert torch.equal(grid, knn_search_aniso(q, p, sigma, R, K, method="brute")), K
        assert torch.equal(grid, knn_search_aniso(q, p, sigma, R, K, method="tile")), K
        assert torch.equal(grid, knn_search_aniso(q, p, sigma, R, K)), K  # "auto": the tiles
        if dtype == torch.float64:
            cpu = knn_search_aniso(*(t.cpu() for t in (q, p, sigma, R)), K, method="brute")
            assert torch.equal(grid.cpu(), cpu), K
