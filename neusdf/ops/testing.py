"""Input builders shared by the op's tests and benchmark."""

from __future__ import annotations

import torch

__all__ = ["OpInputs", "SEARCH_CASES", "make_inputs", "make_search_case", "random_rotations"]

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


SEARCH_CASES = (
    "needles",
    "pancakes",
    "clusters",
    "far-queries",
    "duplicates",
    "flat",
    "one-point-repeated",
    "non-orthonormal",
)


def make_search_case(
    kind: str, B: int, Q: int, P: int, *, dtype=torch.float32, device="cpu", seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Adversarial inputs for the exact grid search (q, p, sigma, R), one of SEARCH_CASES:

    - needles / pancakes: a third of the points have one long axis (needle) or one short axis
      (pancake), precision ratios up to 1e4 (scale ratios up to 100), some up to 1e8;
    - clusters: points in four tight clusters with empty space between, queries anywhere;
    - far-queries: queries 10 to 1000 times the cloud's size away;
    - duplicates: every point three times (exact ties, broken by the lower index);
    - flat: all points on the plane z = 0; one-point-repeated: all points equal;
    - non-orthonormal: axes with large random shears.
    """
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    q, p, _, sigma, R = make_inputs(B, Q, P, 1, dtype=f64, seed=seed)
    if kind in ("needles", "pancakes"):
        sel = torch.rand(B, P, generator=g) < 1 / 3
        ratio = 10 ** (4 * torch.rand(B, P, generator=g, dtype=f64))  # up to 1e4
        ratio[torch.rand(B, P, generator=g) < 0.02] = 1e8
        axis = torch.randint(0, 3, (B, P), generator=g)
        factor = torch.ones(B, P, 3, dtype=f64)
        onehot = torch.nn.functional.one_hot(axis, 3).bool()
        if kind == "needles":  # one axis far less precise (long)
            factor[onehot] = 1 / ratio.flatten()
        else:  # one axis far more precise (thin)
            factor[onehot] = ratio.flatten()
        sigma = torch.where(sel[..., None], sigma * factor, sigma)
    elif kind == "clusters":
        centres = torch.rand(B, 4, 3, generator=g, dtype=f64) * 20 - 10
        which = torch.randint(0, 4, (B, P), generator=g)
        p = torch.gather(centres, 1, which[..., None].expand(-1, -1, 3))
        p = p + 0.05 * torch.randn(B, P, 3, generator=g, dtype=f64)
        q = torch.rand(B, Q, 3, generator=g, dtype=f64) * 24 - 12
    elif kind == "far-queries":
        direction = torch.nn.functional.normalize(
            torch.randn(B, Q, 3, generator=g, dtype=f64), dim=-1
        )
        q = direction * 10 ** (1 + 2 * torch.rand(B, Q, 1, generator=g, dtype=f64))
    elif kind == "duplicates":
        n = (P + 2) // 3
        p, sigma, R = (t[:, :n].repeat_interleave(3, dim=1)[:, :P] for t in (p, sigma, R))
        on = torch.arange(0, Q, 5)[:P]  # some queries sit exactly on points
        q[:, on] = p[:, : on.numel()]
    elif kind == "flat":
        p[..., 2] = 0
    elif kind == "one-point-repeated":
        p, sigma, R = (t[:, :1].expand_as(t).clone() for t in (p, sigma, R))
    elif kind == "non-orthonormal":
        R = R + 2.0 * torch.randn(B, P, 3, 3, generator=g, dtype=f64)
    else:
        raise ValueError(f"unknown search case {kind!r}; choose from {SEARCH_CASES}")
    return tuple(t.to(dtype=dtype, device=device).contiguous() for t in (q, p, sigma, R))  # type: ignore[return-value]
