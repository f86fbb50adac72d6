"""A plain MLP SDF (IGR-style): the baseline that shows what the neural points buy.

    sdf(q) = MLP(q), softplus activations, geometric initialisation to a sphere

Same losses, samples and steps as :class:`neusdf.model.NeuralPointSDF` (``model=mlp``), but no
neural points, no op and no winding-number far field: its sign far from the data is whatever
the network learned (the sign loss needs the far field's labels and is skipped).
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["MLPSDF"]


class MLPSDF(nn.Module):
    """An MLP from (Q, 3) unit-box queries to (Q,) SDF values.

    Args:
        hidden: width. layers: hidden layers (>= 1).
        softplus_beta: sharpness of the softplus activations.
        init_radius: radius of the sphere the SDF starts as (geometric initialisation).
        chunk: queries per forward pass (bounds memory at extraction).
        num_points, init, backend, seed: accepted for the training pipeline's interface and
            ignored (no neural points, no op, no data-dependent init).
    """

    def __init__(
        self,
        hidden: int = 256,
        layers: int = 4,
        softplus_beta: float = 100.0,
        init_radius: float = 0.3,
        chunk: int = 65536,
        num_points: int | None = None,
        init: object | None = None,
        backend: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if hidden < 1 or layers < 1 or chunk < 1:
            raise ValueError("model.hidden, model.layers and model.chunk must be >= 1")
        dims = [3] + [hidden] * layers + [1]
        self.mlp = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))
        self.act = nn.Softplus(beta=softplus_beta)
        self.chunk = chunk
        # Geometric initialisation (Atzmon & Lipman): the SDF starts close to |q| - radius.
        for layer in self.mlp[:-1]:
            nn.init.normal_(layer.weight, 0.0, math.sqrt(2.0) / math.sqrt(layer.out_features))
            nn.init.zeros_(layer.bias)
        last = self.mlp[-1]
        nn.init.normal_(last.weight, math.sqrt(math.pi) / math.sqrt(hidden), 1e-4)
        nn.init.constant_(last.bias, -init_radius)

    @property
    def num_points(self) -> int:
        """No neural points (checkpoints record 0)."""
        return 0

    def param_groups(self, optim: dict) -> list[dict]:
        """One optimiser group at the decoder's learning rate ``optim['lr']``."""
        return [{"params": list(self.parameters()), "lr": optim["lr"], "name": "decoder"}]

    def _forward_chunk(self, q: torch.Tensor) -> torch.Tensor:
        z = q
        for layer in self.mlp[:-1]:
            z = self.act(layer(z))
        return self.mlp[-1](z)[:, 0]

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        """SDF (Q,) at (Q, 3) float32 unit-box queries (twice differentiable in q)."""
        if q.ndim != 2 or q.shape[-1] != 3:
            raise ValueError(f"queries must have shape (Q, 3), got {tuple(q.shape)}")
        if q.shape[0] <= self.chunk:
            return self._forward_chunk(q)
        return torch.cat([self._forward_chunk(c) for c in q.split(self.chunk)])
