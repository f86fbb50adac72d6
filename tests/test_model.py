"""The neural-point SDF: initialisation, far field, differentiability, backends."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neusdf.model import NeuralPointSDF, PointInit, frames_from_normals, quaternion_to_matrix


def sphere_init(n: int = 3000, radius: float = 0.4, seed: int = 0) -> PointInit:
    d = np.random.default_rng(seed).normal(size=(n, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    return PointInit(radius * d, d)


def make(backend: str = "reference", **kw) -> NeuralPointSDF:
    args = dict(num_points=800, feature_dim=8, K=6, hidden=16, backend=backend, init=sphere_init())
    args.update(kw)
    return NeuralPointSDF(**args)


def test_quaternions_and_frames_are_rotations():
    q = torch.randn(50, 4, dtype=torch.float64)
    R = quaternion_to_matrix(q)
    eye = torch.eye(3, dtype=torch.float64).expand(50, 3, 3)
    torch.testing.assert_close(R @ R.transpose(1, 2), eye)
    assert torch.allclose(torch.linalg.det(R), torch.ones(50, dtype=torch.float64))
    # a quarter turn about z, (cos 45, 0, 0, sin 45) unnormalised by 3: maps x to y
    quarter = quaternion_to_matrix(3 * torch.tensor([0.5**0.5, 0.0, 0.0, 0.5**0.5]))
    torch.testing.assert_close(quarter @ torch.tensor([1.0, 0, 0]), torch.tensor([0.0, 1, 0]))
    n = sphere_init(100).normals
    F = frames_from_normals(n)
    np.testing.assert_allclose(F[:, 2], n, atol=1e-12)
    np.testing.assert_allclose(
        F @ F.transpose(0, 2, 1), np.broadcast_to(np.eye(3), F.shape), atol=1e-12
    )


def test_init_is_a_signed_distance_to_the_input():
    net = make()
    assert net.num_points == 800
    # the third Gaussian axis is the surface normal at init
    _, R = net.gaussians()
    cos = torch.nn.functional.cosine_similarity(R[:, 2], net.points, dim=-1)
    assert (cos > 0.999).all()
    q = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.3], [0.0, 0.45, 0.0], [0.3, 0.3, 0.3]])
    exact = q.norm(dim=-1) - 0.4
    with torch.no_grad():
        sdf = net(q)
    # signs everywhere; values close to the exact SDF near the surface
    assert torch.equal(torch.sign(sdf), torch.sign(exact))
    assert (sdf[1:3] - exact[1:3]).abs().max() < 0.01


def test_far_queries_get_a_sensible_sdf():
    # far outside every Gaussian (exp(-D) underflows to 0): still finite, positive outside
    # and growing with distance like a distance would
    net = make()
    q = torch.tensor([[5.0, 0, 0], [0, -20.0, 0], [3.0, 3.0, 3.0], [100.0, 0, 0]])
    q.requires_grad_(True)
    sdf = net(q)
    (g,) = torch.autograd.grad(sdf.sum(), q)
    assert torch.isfinite(sdf).all() and torch.isfinite(g).all()
    exact = q.detach().norm(dim=-1) - 0.4
    assert ((sdf.detach() - exact).abs() / exact < 0.05).all()
    assert ((g.norm(dim=-1) - 1).abs() < 0.05).all()


def test_eikonal_graph_reaches_every_parameter():
    net = make()
    # a non-zero last layer, so that every decoder parameter takes part in the gradient
    torch.nn.init.normal_(net.mlp[-1].weight, std=0.1)
    q = (torch.rand(200, 3) - 0.5).requires_grad_(True)
    sdf = net(q)
    (g,) = torch.autograd.grad(sdf.sum(), q, create_graph=True)
    loss = ((g.norm(dim=-1) - 1) ** 2).mean() + sdf.abs().mean()
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_chunking_does_not_change_values():
    net = make()
    torch.nn.init.normal_(net.mlp[-1].weight, std=0.1)
    q = torch.rand(300, 3) - 0.5
    with torch.no_grad():
        whole = net(q)
        net.chunk = 64
        parts = net(q)
    torch.testing.assert_close(whole, parts)


def test_bad_options_name_the_option():
    with pytest.raises(ValueError, match="model.backend"):
        make(backend="cuda-magic")
    with pytest.raises(ValueError, match="model.K"):
        make(num_points=10, K=20)
    with pytest.raises(ValueError, match="model.feature_dim"):
        make(feature_dim=0)


def test_compiled_backend_matches_reference():
    # no skip: the op builds wherever the tests run (CPU included), so a broken build fails
    compiled = make(backend="compiled")
    ref = make(backend="reference")
    ref.load_state_dict(compiled.state_dict())
    for net in (compiled, ref):
        torch.nn.init.constant_(net.mlp[-1].weight, 0.05)
    q = (torch.rand(256, 3) - 0.5).requires_grad_(True)
    out = []
    for net in (compiled, ref):
        s = net(q)
        (g,) = torch.autograd.grad(s.sum(), q, create_graph=True)
        ((g.norm(dim=-1) - 1) ** 2).mean().backward()
        out.append((s.detach(), g.detach(), net.points.grad, net.log_scales.grad))
    for a, b in zip(*out, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
