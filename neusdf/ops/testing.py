"""Input builders shared by the op's tests and benchmark."""

from __future__ import annotations

import torch

__all__ = ["OpInputs", "make_inputs", "random_rotations"]

OpInputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def random_rotations(n: int, generator: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    """(n, 3, 3) uniformly random rotation matrices (QR of Gaussian matrices, det +1)."""
    a = torch.randn(n, 3, 3, generator=generator, dtype=torch.float64)
    qm, r = torch.linalg.qr(a)
    qm = qm * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]
    qm[torch.det(qm) < 0, :, 0] *= -1
    return qm.to(dtype)


def make_inputs(
    B: int,
    Q: int,
    P: int,
    F: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    scale: float = 0.1,
    anisotropy: float = 4.0,
    orthonormal: bool = True,
    requires_grad: bool = False,
) -> OpInputs:
    """Random op inputs resembling a neural-point cloud: points in the unit cube.

    Args:
        B, Q, P, F: batch, queries, points, feature channels.
        scale: typical Gaussian radius; precisions are 1 / radius^2.
        anisotropy: ratio between the largest and smallest radius of each point.
        orthonormal: rotations if True, else rotations plus a random perturbation.
        requires_grad: mark the five float inputs as requiring grad.

    Returns:
        q (B, Q, 3), p (B, P, 3), f (B, P, F), sigma (B, P, 3), R (B, P, 3, 3) of ``dtype``
        on ``device``; queries are drawn partly near points and partly uniformly.
    """
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(B, P, 3, generator=g, dtype=torch.float64) * 2 - 1
    near = p[:, torch.randint(0, P, (Q,), generator=g)] + scale * torch.randn(
        B, Q, 3, generator=g, dtype=torch.float64
    )
    uniform = torch.rand(B, Q, 3, generator=g, dtype=torch.float64) * 2 - 1
    q = torch.where(torch.rand(B, Q, 1, generator=g) < 0.7, near, uniform)
    f = torch.randn(B, P, F, generator=g, dtype=torch.float64)
    radii = scale * anisotropy ** (torch.rand(B, P, 3, generator=g, dtype=torch.float64) - 0.5)
    sigma = 1.0 / radii**2
    R = random_rotations(B * P, g).reshape(B, P, 3, 3)
    if not orthonormal:
        R = R + 0.3 * torch.randn(B, P, 3, 3, generator=g, dtype=torch.float64)
    out = tuple(t.to(dtype=dtype, device=device).contiguous() for t in (q, p, f, sigma, R))
    if requires_grad:
        for t in out:
            t.requires_grad_()
    return out  # type: ignore[return-value]
