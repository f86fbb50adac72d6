"""Loss terms on an analytic sphere SDF, whose values and gradients are known exactly."""

from __future__ import annotations

import pytest
import torch

from neusdf.losses import sdf_and_gradient, sdf_losses

R = 0.35
WEIGHTS = {"surface": 1.0, "normal": 1.0, "eikonal": 1.0, "offsurface": 1.0, "near": 1.0}


def sphere(q: torch.Tensor) -> torch.Tensor:
    return q.norm(dim=-1) - R


def _samples(n: int = 500):
    g = torch.Generator().manual_seed(0)
    dirs = torch.nn.functional.normalize(
        torch.randn(n, 3, generator=g, dtype=torch.float64), dim=-1
    )
    surface = dirs * R
    offset = (torch.rand(n, generator=g, dtype=torch.float64) - 0.5) * 0.05
    near = surface + offset[:, None] * dirs  # moved along the normal: exact signed distance
    space = (torch.rand(n, 3, generator=g, dtype=torch.float64) - 0.5) + 0.7  # away from 0
    return {"surface": surface, "near": near, "space": space}, dirs, offset


def _evaluate(fn):
    x, normals, offset = _samples()
    sdf, grad = {}, {}
    for k, q in x.items():
        sdf[k], grad[k] = sdf_and_gradient(fn, q)
    return sdf, grad, normals, offset


def test_exact_sdf_has_zero_losses_except_offsurface():
    sdf, grad, normals, offset = _evaluate(sphere)
    terms = sdf_losses(sdf, grad, normals, offset, WEIGHTS, offsurface_alpha=100.0)
    for k in ("surface", "normal", "eikonal", "near"):
        assert terms[k].item() == pytest.approx(0.0, abs=1e-12), k
    # uniform samples lie at distance >= 0.1 from the sphere here: exp(-100 d) is tiny
    assert 0 < terms["offsurface"].item() < 1e-4
    expected = sum(WEIGHTS[k] * terms[k] for k in WEIGHTS)
    assert terms["loss"].item() == pytest.approx(expected.item())


def test_each_term_detects_its_defect():
    # twice the SDF: still zero on the surface and normals aligned, but |grad| = 2 and the
    # near-surface values are doubled
    sdf, grad, normals, offset = _evaluate(lambda q: 2 * sphere(q))
    t = sdf_losses(sdf, grad, normals, offset, WEIGHTS)
    assert t["eikonal"].item() == pytest.approx(1.0, rel=1e-9)
    assert t["near"].item() == pytest.approx(offset.abs().mean().item(), rel=1e-9)
    assert t["surface"].item() == pytest.approx(0.0, abs=1e-12)
    # a shifted sphere violates the surface term by the shift; flipped normals give 1 - cos = 2
    sdf, grad, normals, offset = _evaluate(lambda q: sphere(q) + 0.01)
    assert sdf_losses(sdf, grad, normals, offset, WEIGHTS)["surface"].item() == pytest.approx(0.01)
    sdf, grad, normals, offset = _evaluate(lambda q: -sphere(q))
    assert sdf_losses(sdf, grad, normals, offset, WEIGHTS)["normal"].item() == pytest.approx(2.0)


def test_terms_without_normals_and_zero_weights_are_skipped():
    sdf, grad, _, _ = _evaluate(sphere)
    t = sdf_losses(sdf, grad, None, None, {**WEIGHTS, "offsurface": 0.0})
    assert set(t) == {"surface", "eikonal", "loss"}


def test_unknown_term_is_an_error():
    sdf, grad, normals, offset = _evaluate(sphere)
    with pytest.raises(ValueError, match="eikonall"):
        sdf_losses(sdf, grad, normals, offset, {"eikonall": 1.0})


def test_eikonal_gradient_flows_to_parameters():
    # the Eikonal term must be trainable: its gradient w.r.t. a parameter of the SDF exists
    s = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    sdf, grad, normals, offset = _evaluate(lambda q: s * sphere(q))
    t = sdf_losses(sdf, grad, normals, offset, {"eikonal": 1.0})
    (g,) = torch.autograd.grad(t["loss"], s)
    assert g.item() == pytest.approx(2 * (1.5 - 1.0))  # d/ds (s - 1)^2
