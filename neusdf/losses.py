"""Training losses of a neural SDF, given the SDF and its gradient at the step's samples.

All terms are means over their samples, so weights do not depend on sample counts:

- ``surface``: |sdf| on surface samples (the zero level set passes through the data);
- ``normal``: 1 - cos(grad sdf, n) on surface samples (when the input has normals);
- ``eikonal``: (|grad sdf| - 1)^2 on surface, near-surface and uniform samples;
- ``offsurface``: exp(-alpha |sdf|) on uniform samples (no spurious zero level sets away from
  the data, as in SIREN);
- ``near``: |sdf - t| on near-surface samples, t the jitter's component along the normal
  (first-order signed distance; only with normals);
- ``sign``: max(0, -s sdf) on uniform samples, s in [-1, 1] the sign that the input's winding
  number gives there (0 where it is undecided): the learned part of the SDF must not put a
  zero crossing where the data says "clearly inside" or "clearly outside".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

__all__ = ["LOSS_TERMS", "LossConfig", "sdf_losses", "sdf_and_gradient"]

LOSS_TERMS = ("surface", "normal", "eikonal", "offsurface", "near", "sign")


@dataclass(frozen=True)
class LossConfig:
    """The ``loss`` config: a weight per term and the off-surface decay.

    Attributes:
        weights: weight per term in :data:`LOSS_TERMS` (missing or 0: the term is skipped).
        offsurface_alpha: decay of the off-surface penalty exp(-alpha |sdf|), per unit-box
            length.
    """

    weights: dict[str, float] = field(default_factory=dict)
    offsurface_alpha: float = 100.0

    @classmethod
    def from_dict(cls, cfg: Mapping[str, float]) -> LossConfig:
        """Splits a flat ``loss`` config (term weights plus ``offsurface_alpha``)."""
        weights = {k: float(v) for k, v in cfg.items() if k != "offsurface_alpha"}
        return cls(weights, float(cfg.get("offsurface_alpha", cls.offsurface_alpha)))


def sdf_and_gradient(
    fn, q: torch.Tensor, create_graph: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDF values and their gradients w.r.t. the queries.

    Args:
        fn: maps (Q, 3) -> (Q,). q: (Q, 3) queries (a detached copy is differentiated).
        create_graph: keep the graph of the gradient (needed to train on it).

    Returns:
        sdf (Q,) and grad (Q, 3).
    """
    q = q.detach().requires_grad_(True)
    with torch.enable_grad():
        sdf = fn(q)
        (grad,) = torch.autograd.grad(sdf.sum(), q, create_graph=create_graph)
    return sdf, grad


def sdf_losses(
    sdf: dict[str, torch.Tensor],
    grad: dict[str, torch.Tensor],
    surface_normals: torch.Tensor | None,
    near_offset: torch.Tensor | None,
    weights: dict[str, float],
    offsurface_alpha: float = LossConfig.offsurface_alpha,
    space_sign: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Weighted loss terms and their total.

    Args:
        sdf: per sample set ('surface', 'space', 'near') the (N,) SDF values.
        grad: the same keys, (N, 3) gradients of the SDF w.r.t. the samples.
        surface_normals: (Ns, 3) unit normals of the surface samples, or None.
        near_offset: (Nn,) signed offsets of the near-surface samples, or None.
        weights: weight per term in :data:`LOSS_TERMS` (missing or 0: the term is skipped).
        offsurface_alpha: decay of the off-surface penalty (1 / distance unit).
        space_sign: (Nu,) expected sign in [-1, 1] of the uniform samples' SDF, or None.

    Returns:
        dict of the unweighted terms that were computed plus ``loss`` (the weighted sum).
    """
    unknown = set(weights) - set(LOSS_TERMS)
    if unknown:
        raise ValueError(f"loss: unknown terms {sorted(unknown)}; expected {list(LOSS_TERMS)}")
    terms: dict[str, torch.Tensor] = {}
    if weights.get("surface", 0):
        terms["surface"] = sdf["surface"].abs().mean()
    if weights.get("normal", 0) and surface_normals is not None:
        cos = torch.nn.functional.cosine_similarity(grad["surface"], surface_normals, dim=-1)
        terms["normal"] = (1 - cos).mean()
    if weights.get("eikonal", 0):
        g = torch.cat([grad[k] for k in ("surface", "near", "space") if k in grad])
        terms["eikonal"] = ((g.norm(dim=-1) - 1) ** 2).mean()
    if weights.get("offsurface", 0):
        terms["offsurface"] = torch.exp(-offsurface_alpha * sdf["space"].abs()).mean()
    if weights.get("near", 0) and near_offset is not None:
        terms["near"] = (sdf["near"] - near_offset).abs().mean()
    if weights.get("sign", 0) and space_sign is not None:
        terms["sign"] = torch.relu(-space_sign * sdf["space"]).mean()
    total = sum(weights[k] * v for k, v in terms.items())
    terms["loss"] = total if isinstance(total, torch.Tensor) else torch.zeros(())
    return terms
