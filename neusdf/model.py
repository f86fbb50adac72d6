"""The point-based neural SDF: learnable anisotropic neural points, the op, a small decoder.

For a query q the op finds its K nearest neural points under each point's Gaussian metric
and returns sum_k w_k f_k with w_k = exp(-D_k). The SDF is

    sdf(q) = plane(q) + gate(q) * mlp([f_out / (W + eps), plane(q) / s, enc(q)])

with s the mean spacing of the neural points at init.

- ``plane(q) = sum_k a_k n_k . (q - p_k)`` over the K Euclidean-nearest neural points, with
  a = softmax(-|q - p_k|^2 / h^2), is the implicit-MLS distance to the points' tangent planes
  (n_k is the Gaussian's third axis; h^2 = (bandwidth * s)^2 + min_k |q - p_k|^2).
  Euclidean neighbours, not the anisotropic ones: the nearest point's tangent plane has the
  right sign for any query (q - p is along the normal at the closest point), whereas an
  elongated Gaussian can be "nearest" from far away on the wrong side. The softmax is computed
  from distances, so it stays finite where every exp(-D) underflows: far from all points the
  SDF is still the signed distance to the nearest tangent planes, a sensible far field.
- ``W = sum_k w_k`` and ``gate = W / (W + eps)`` switch the learned correction off where no
  Gaussian reaches, so the decoder never sees the meaningless 0/0 feature there.
- The decoder's last layer starts at zero (geometric initialisation): at step 0 the SDF is
  the implicit-MLS field of the input surface, already signed and near-Eikonal.

Far from the data the tangent planes are not trustworthy: beyond the tip of a thin part, between
close limbs or under an overhang, the nearest points' planes disagree about the sign, and a
spurious sheet of surface appears in empty space (measured: a sparse horse grew one 0.24 from
every input point before any training). So the sign far away comes from the generalised
winding number w of the oriented neural points at init (:mod:`neusdf.winding`), a global and
robust inside/outside indicator, stored on a grid in the checkpoint:

    sdf = (1 - beta) * near + beta * s(q) * dmin(q),      s = clamp(4 (1 - 2 w), -1, 1)

with ``near`` the field above, dmin the distance to the nearest neural point and beta a
smoothstep from 0 at ``far_start`` to 1 at ``far_end`` mean spacings from the points. Beyond
``far_end`` nothing learned can put a zero crossing (no Gaussian that grows into empty space,
no disagreeing planes); only where w itself is 1/2 (across a hole of an open scan) does the
far field pass through zero, and extraction trims that part (:meth:`NeuralPointSDF.surface_trim`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from scipy.spatial import cKDTree
from torch import nn

from neusdf.geometry import estimate_normals, host_threads
from neusdf.meshing import Trim
from neusdf.ops import (
    SEARCH_METHODS,
    knn_aggregate_aniso,
    knn_aggregate_aniso_reference,
    knn_search_aniso,
    knn_search_aniso_reference,
)
from neusdf.winding import point_areas, sample_grid, winding_grid

__all__ = [
    "PointInit",
    "NeuralPointSDF",
    "coverage_sample",
    "quaternion_to_matrix",
    "frames_from_normals",
]

# Queries per op call by default: bounds the op's memory (neighbour lists, double backward).
DEFAULT_CHUNK = 65_536

OpFn = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]


def _ops(backend: str) -> tuple[OpFn, Callable[..., torch.Tensor]]:
    """The kNN aggregation and the search-only function for ``backend``."""
    if backend == "reference":  # brute force whatever the method: the same neighbours
        return knn_aggregate_aniso_reference, knn_search_aniso_reference
    if backend == "compiled":  # built on its first call, not on import
        return knn_aggregate_aniso, knn_search_aniso
    raise ValueError(f"model.backend must be 'compiled' or 'reference', got '{backend}'")


def quaternion_to_matrix(quat: torch.Tensor) -> torch.Tensor:
    """Rotation matrices of quaternions (w, x, y, z), normalised first.

    Args:
        quat: (..., 4) float tensor, not necessarily unit length (non-zero).

    Returns:
        (..., 3, 3) rotation matrices.
    """
    q = F.normalize(quat, dim=-1)
    w, v = q[..., :1, None], q[..., 1:]
    zero = torch.zeros_like(v[..., 0])
    x, y, z = v.unbind(-1)
    # Rodrigues form R = I + 2 (w [v]x + [v]x^2): a handful of batched ops instead of nine
    # scalar polynomials, which matters because the training step is bound by op dispatch.
    cross = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], dim=-1)
    cross = cross.reshape(*v.shape[:-1], 3, 3)
    eye = torch.eye(3, dtype=quat.dtype, device=quat.device)
    return eye + 2 * (w * cross + cross @ cross)


def frames_from_normals(normals: np.ndarray) -> np.ndarray:
    """Orthonormal frames whose third row is the normal.

    Args:
        normals: (N, 3) unit vectors.

    Returns:
        (N, 3, 3) float64 rotations; rows are (tangent, bitangent, normal).
    """
    # Cross with the coordinate axis least aligned with n: never near-parallel.
    helper = np.eye(3)[np.argmin(np.abs(normals), axis=1)]
    t1 = np.cross(normals, helper)
    t1 /= np.linalg.norm(t1, axis=1, keepdims=True)
    t2 = np.cross(normals, t1)
    return np.stack([t1, t2, normals], axis=1)


# Input points kept for the extraction's trim (a random subset of larger inputs).
COVERAGE_POINTS = 131_072
# A point's local spacing: the distance to its COVERAGE_NEIGHBOUR-th nearest other point.
COVERAGE_NEIGHBOUR = 16


def coverage_sample(points: np.ndarray, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to :data:`COVERAGE_POINTS` input points and each one's local spacing.

    The spacing is the distance to the 16th-nearest other point of the sample: for uniform
    random samples about 4.8 times the median nearest-neighbour distance, larger where the
    sample is sparse, and steadier from point to point than a nearer neighbour's distance
    (which would leave pinholes where a random gap meets a locally tight cluster).

    Args:
        points: (N, 3) float array, N >= 2.

    Returns:
        (M, 3) float32 points and (M,) float32 spacings, M = min(N, COVERAGE_POINTS).
    """
    n = len(points)
    if n > COVERAGE_POINTS:
        points = points[np.random.default_rng(seed).choice(n, COVERAGE_POINTS, replace=False)]
    k = min(COVERAGE_NEIGHBOUR, len(points) - 1)
    d, _ = cKDTree(points).query(points, k=k + 1, workers=host_threads())
    spacing = np.maximum(d[:, k], 1e-6)
    return torch.as_tensor(points, dtype=torch.float32), torch.as_tensor(spacing).float()


@dataclass
class PointInit:
    """Where neural points start: a surface sample in unit-box coordinates.

    Attributes:
        points: (N, 3) float array. normals: (N, 3) unit normals, or None (then estimated
            by PCA on the chosen neural points, see :func:`neusdf.geometry.estimate_normals`).
    """

    points: np.ndarray
    normals: np.ndarray | None


class NeuralPointSDF(nn.Module):
    """Neural points + kNN op + decoder: maps (Q, 3) unit-box queries to (Q,) SDF values.

    Args:
        num_points: neural points P (capped by the surface sample's size at init).
        feature_dim: feature channels per point.
        K: neighbours per query (<= P).
        hidden: decoder width. layers: decoder hidden layers.
        frequencies: octaves of the sin/cos encoding of q fed to the decoder (0: q only).
        scale_factor: initial Gaussian scale as a multiple of the local point spacing.
        plane_bandwidth: bandwidth h of the tangent-plane blend, in mean point spacings.
        far_start / far_end: where the far field (winding-number sign times the distance to the
            nearest point) starts and takes over, in mean point spacings.
        winding_resolution: nodes per axis of the winding-number grid over the sampling box.
        trim_reach: extraction drops surface farther than ``trim_reach`` local input spacings
            from the input (:meth:`surface_trim`).
        trim_grow: and, with it, the surface connected to it through points farther than
            ``trim_grow`` local spacings (``0 < trim_grow <= trim_reach``; see
            :class:`neusdf.meshing.Trim`).
        box: half-size of the domain [-box, box]^3 that the grid covers.
        softplus_beta: sharpness of the decoder's softplus (smooth, so the Eikonal loss has
            useful second derivatives).
        eps: floor of the weight sum in the feature normalisation and the gate.
        backend: 'compiled' (the op) or 'reference' (plain PyTorch).
        search: the compiled op's neighbour search for the SDF's queries, 'auto', 'grid',
            'tile' or 'brute' (the same neighbours; only the speed differs, see docs/op.md).
        chunk: queries per op call (bounds the op's memory).
        init: the surface to start from; None builds placeholders of the right shapes for
            loading a checkpoint.
        seed: seed of the subsampling at init.
    """

    def __init__(
        self,
        num_points: int = 16384,
        feature_dim: int = 32,
        K: int = 8,
        hidden: int = 64,
        layers: int = 2,
        frequencies: int = 2,
        scale_factor: float = 1.5,
        plane_bandwidth: float = 1.0,
        far_start: float = 2.0,
        far_end: float = 4.0,
        winding_resolution: int = 64,
        trim_reach: float = 1.0,
        trim_grow: float = 0.7,
        box: float = 0.55,
        softplus_beta: float = 100.0,
        eps: float = 1e-3,
        backend: str = "compiled",
        search: str = "auto",
        chunk: int = DEFAULT_CHUNK,
        init: PointInit | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        sizes = {"num_points": num_points, "feature_dim": feature_dim, "K": K, "hidden": hidden}
        for name, value in {**sizes, "chunk": chunk}.items():
            if value < 1:
                raise ValueError(f"model.{name} must be >= 1, got {value}")
        if frequencies < 0 or layers < 0:
            raise ValueError("model.frequencies and model.layers must be >= 0")
        if plane_bandwidth <= 0:
            raise ValueError(f"model.plane_bandwidth must be > 0, got {plane_bandwidth}")
        if not 0 <= far_start < far_end:
            raise ValueError(
                f"model.far_start and model.far_end must satisfy 0 <= far_start < far_end, "
                f"got {far_start} and {far_end}"
            )
        if winding_resolution < 2:
            raise ValueError(f"model.winding_resolution must be >= 2, got {winding_resolution}")
        if not 0 < trim_grow <= trim_reach:
            raise ValueError(
                "model.trim_grow and model.trim_reach must satisfy 0 < trim_grow <= trim_reach, "
                f"got {trim_grow} and {trim_reach}"
            )
        if search not in SEARCH_METHODS:
            raise ValueError(f"model.search must be one of {list(SEARCH_METHODS)}, got '{search}'")
        op, self.search = _ops(backend)
        # the SDF's queries search with ``search``; other searches (the trim's) keep the op's
        # own choice
        self.op, self._query_search = op, self.search
        if backend == "compiled":
            self.op = partial(op, search=search)
            self._query_search = partial(self.search, method=search)
        self.backend = backend
        self.eps, self.chunk, self.frequencies = eps, chunk, frequencies
        self.plane_bandwidth = plane_bandwidth
        self.far_start, self.far_end, self.box = far_start, far_end, box
        self.trim_reach, self.trim_grow = trim_reach, trim_grow
        if init is not None:
            pts, frames, spacing = self._init_points(init, num_points, seed)
        else:
            pts = np.zeros((num_points, 3))
            frames = np.broadcast_to(np.eye(3), (num_points, 3, 3))
            spacing = np.full(num_points, 1.0)
        P = len(pts)
        if K > P:
            raise ValueError(f"model.K={K} exceeds the number of neural points ({P})")
        self.K = K
        f32 = torch.float32
        self.points = nn.Parameter(torch.as_tensor(pts, dtype=f32))
        self.features = nn.Parameter(torch.randn(P, feature_dim) * 0.1)
        log_scale = np.log(np.repeat(spacing[:, None] * scale_factor, 3, axis=1))
        self.log_scales = nn.Parameter(torch.as_tensor(log_scale, dtype=f32))
        # Rotation = (learned quaternion rotation) applied to the initial frame, so the
        # quaternion starts at identity whatever the frame.
        self.quats = nn.Parameter(torch.tensor([1.0, 0, 0, 0]).repeat(P, 1))
        self.register_buffer("frames0", torch.as_tensor(np.ascontiguousarray(frames), dtype=f32))
        self.register_buffer("spacing", torch.tensor(float(np.mean(spacing))))
        if init is not None:
            # the winding number of the neural points as placed: each stands for its share of
            # the surface's area
            # O(resolution^3 x P) pairs: on a GPU where there is one (seconds on a CPU)
            dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            wind = winding_grid(
                self.points.detach().to(dev),
                self.frames0[:, 2].to(dev),
                torch.as_tensor(point_areas(pts), dtype=f32, device=dev),
                winding_resolution,
                box,
            ).cpu()
        else:
            wind = torch.zeros((winding_resolution,) * 3)
        self.register_buffer("winding", wind)
        # Where the input is: a sample of it with each point's local spacing, kept for the
        # extraction's trim (sized by the data; a checkpoint brings its own, see
        # _load_from_state_dict).
        cover = None if init is None else coverage_sample(init.points, seed)
        self.register_buffer("data_points", None if cover is None else cover[0])
        self.register_buffer("data_spacing", None if cover is None else cover[1])
        # A constant of every forward, kept as a (non-checkpointed) buffer so that a step does
        # not rebuild it: the encoding's frequencies.
        freq = math.pi * 2.0 ** torch.arange(frequencies, dtype=f32)
        self.register_buffer("freq", freq, persistent=False)
        enc_dim = 3 + 6 * frequencies
        dims = [feature_dim + 1 + enc_dim] + [hidden] * layers + [1]
        self.mlp = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))
        self.act = nn.Softplus(beta=softplus_beta)
        self._geometric_init()

    @staticmethod
    def _init_points(
        init: PointInit, num_points: int, seed: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Subsamples the surface; returns positions, frames and per-point local spacing."""
        n = len(init.points)
        rng = np.random.default_rng(seed)
        sel = rng.choice(n, size=num_points, replace=False) if n > num_points else np.arange(n)
        pts = init.points[sel]
        # Mean distance to the 3 nearest other points: the Gaussian's scale follows the local
        # density, so sparse regions get wide Gaussians and dense ones sharp ones.
        d, _ = cKDTree(pts).query(pts, k=min(4, len(pts)), workers=host_threads())
        spacing = d[:, 1:].mean(1) if d.ndim == 2 and d.shape[1] > 1 else np.ones(len(pts))
        spacing = np.maximum(spacing, 1e-4)
        normals = estimate_normals(pts) if init.normals is None else init.normals[sel]
        return pts, frames_from_normals(normals), spacing

    def _geometric_init(self) -> None:
        """Zero last layer (SDF starts as the implicit-MLS field); He-like hidden layers."""
        for layer in self.mlp[:-1]:
            nn.init.normal_(layer.weight, 0.0, math.sqrt(2.0) / math.sqrt(layer.out_features))
            nn.init.zeros_(layer.bias)
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    @property
    def num_points(self) -> int:
        """Number of neural points P."""
        return self.points.shape[0]

    def param_groups(self, optim: dict) -> list[dict]:
        """Optimiser groups with their learning rates (``optim``: ``lr_points``,
        ``lr_features``, ``lr_gaussians``, ``lr`` for the decoder)."""
        return [
            {"params": [self.points], "lr": optim["lr_points"], "name": "points"},
            {"params": [self.features], "lr": optim["lr_features"], "name": "features"},
            {
                "params": [self.log_scales, self.quats],
                "lr": optim["lr_gaussians"],
                "name": "gaussians",
            },
            {"params": list(self.mlp.parameters()), "lr": optim["lr"], "name": "decoder"},
        ]

    def gaussians(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-point precisions sigma (P, 3) = scale^-2 and axes R (P, 3, 3) (rows)."""
        sigma = torch.exp(-2.0 * self.log_scales)
        R = quaternion_to_matrix(self.quats) @ self.frames0
        return sigma, R

    def encode(self, q: torch.Tensor) -> torch.Tensor:
        """Low-frequency encoding of (Q, 3) queries: q and sin/cos(2^l pi q), l < frequencies."""
        if self.frequencies == 0:
            return q
        x = (q[:, None, :] * self.freq[:, None]).reshape(q.shape[0], -1)
        return torch.cat([q, torch.sin(x), torch.cos(x)], dim=-1)

    def _forward_chunk(self, q: torch.Tensor, sigma: torch.Tensor, R: torch.Tensor):
        """SDF (Q,) of one chunk of queries (Q, 3)."""
        f_out, w, _, _ = self.op(
            q[None], self.points[None], self.features[None], sigma[None], R[None], self.K
        )
        f_out, w = f_out[0], w[0]
        plane, dmin = self._plane(q, R[:, 2])
        wsum = w.sum(-1, keepdim=True)
        feat = f_out / (wsum + self.eps)
        z = torch.cat([feat, plane[:, None] / self.spacing, self.encode(q)], dim=-1)
        for layer in self.mlp[:-1]:
            z = self.act(layer(z))
        correction = self.mlp[-1](z)[:, 0]
        gate = (wsum / (wsum + self.eps))[:, 0]
        near = plane + gate * correction
        t = ((dmin / self.spacing - self.far_start) / (self.far_end - self.far_start)).clamp(0, 1)
        beta = t * t * (3 - 2 * t)
        return near + beta * (self.far_sign(q) * dmin - near)

    def far_sign(self, q: torch.Tensor) -> torch.Tensor:
        """Sign of the far field at (Q, 3) queries: +-1 where the winding number is decided.

        clamp(4 (1 - 2 w), -1, 1): +1 outside (w <= 3/8), -1 inside (w >= 5/8), a ramp
        through 0 where w is near 1/2 (the surface, or a hole of an open surface).
        Not differentiable (the grid is a constant of the data).
        """
        return (4 * (1 - 2 * sample_grid(self.winding, q, self.box))).clamp(-1, 1)

    def data_reach(self, x: torch.Tensor) -> torch.Tensor:
        """(N,) distance of (N, 3) unit-box positions to the nearest input point (of the stored
        sample, :func:`coverage_sample`), in local input spacings.

        The local spacing is the median of the stored spacings of the position's 16 nearest
        input points: at the rim of a hole every point's own spacing is inflated (its
        neighbours lie on one side), the median over a neighbourhood that reaches inwards
        less so. A model without the sample (a checkpoint of an earlier version) measures the
        distance to the nearest neural point in mean point spacings instead.
        """
        x = x.detach()
        if self.data_points is None:
            ref, k = self.points.detach(), 1
        else:
            ref, k = self.data_points, min(COVERAGE_NEIGHBOUR, self.data_points.shape[0])
        idx = self.search(x[None], ref[None], None, None, k)[0]  # Euclidean
        d = (x - ref[idx[:, 0]]).norm(dim=-1)
        if self.data_points is None:
            return d / self.spacing
        return d / self.data_spacing[idx].median(dim=1).values

    def surface_trim(self) -> Trim:
        """The extraction's trim: surface away from the input is the far field's zero crossing
        where the winding number is 1/2 (across a hole of an open scan), not data.

        Drops surface farther than ``trim_reach`` local spacings from the input, and the
        surface connected to it through points farther than ``trim_grow`` (the whole cap
        across a hole; a random gap of a sparse sample, which never reaches ``trim_reach``,
        keeps its surface: :class:`neusdf.meshing.Trim`). A checkpoint without the input
        sample trims pointwise at ``far_end`` mean point spacings from the neural points, as
        the version that wrote it did.
        """
        if self.data_points is None:
            return Trim(self.data_reach, self.far_end, self.far_end)
        return Trim(self.data_reach, self.trim_reach, self.trim_grow)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # The input sample describes the data: a net built without data (init=None, to
        # extract from a checkpoint) takes the checkpoint's, of the checkpoint's size; a net
        # built from this run's data keeps its own (the same values when resuming on the same
        # data; this run's when resuming on other data with resume_other_data=true).
        for name in ("data_points", "data_spacing"):
            key, own = prefix + name, getattr(self, name)
            if key not in state_dict:
                continue
            if own is None:
                setattr(self, name, torch.empty_like(state_dict[key], device=self.points.device))
            else:
                state_dict[key] = own
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _plane(self, q: torch.Tensor, normals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Implicit-MLS tangent-plane distance (Q,) over the K Euclidean-nearest points, and the
        distance (Q,) to the nearest point."""
        # sigma = R = None: the Euclidean metric (on CUDA a kernel that reads positions only)
        pts = self.points[None].detach()
        idx = self._query_search(q[None].detach(), pts, None, None, self.K)[0]
        # one gather for positions and normals (each gather costs several kernels per order
        # of differentiation)
        pn = torch.cat([self.points, normals], dim=-1)[idx]  # (Q, K, 6)
        d = q[:, None, :] - pn[..., :3]
        d2 = (d * d).sum(-1)
        # The bandwidth widens with the distance to the nearest point: a fixed one would make
        # far queries switch abruptly between tangent planes (huge gradients on the Voronoi
        # boundaries, fighting the Eikonal loss); this keeps the blend smooth at all ranges.
        d2min = d2.min(-1, keepdim=True).values
        h2 = (self.plane_bandwidth * self.spacing) ** 2 + d2min
        a = torch.softmax(-d2 / h2, dim=-1)  # finite however far q is
        # +tiny: sqrt's derivative stays finite at a query that sits on a point
        dmin = (d2min[:, 0] + 1e-12).sqrt()
        return (a * (d * pn[..., 3:]).sum(-1)).sum(-1), dmin

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        """SDF at unit-box queries.

        Args:
            q: (Q, 3) float32 queries (may require grad; the SDF is twice differentiable in q
                through the op's double backward).

        Returns:
            (Q,) float32 signed distances (negative inside).
        """
        if q.ndim != 2 or q.shape[-1] != 3:
            raise ValueError(f"queries must have shape (Q, 3), got {tuple(q.shape)}")
        sigma, R = self.gaussians()
        if q.shape[0] <= self.chunk:
            return self._forward_chunk(q, sigma, R)
        return torch.cat([self._forward_chunk(c, sigma, R) for c in q.split(self.chunk)])
