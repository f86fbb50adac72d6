"""Geometry shared by training, extraction and scoring: the unit-box normalisation, area-weighted
surface sampling, point-cloud normals and the measurements a run sizes itself from.

The unit box: the input's bounding box centred at the origin with its longest side 1. Training,
extraction and the metrics all work in it, and outputs return to the input's coordinates
through the same :class:`Normalization`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import breadth_first_order, connected_components, minimum_spanning_tree
from scipy.spatial import cKDTree

from neusdf.mesh_io import ShapeError

__all__ = [
    "InputStats",
    "Normalization",
    "estimate_normals",
    "host_threads",
    "measure_points",
    "neighbourhood_covariances",
    "orient_normals",
    "pca_normals",
    "sample_triangles",
    "smallest_eigenvectors",
]


def host_threads() -> int:
    """Threads for this process's parallel CPU work (scipy's k-d tree queries, ``workers=``).

    The cores this process may run on (its CPU affinity: a SLURM allocation, ``taskset``), at
    most ``OMP_NUM_THREADS`` where that is set. The joblib launcher sets it to each worker's
    share of the cores; scipy's own ``workers=-1`` would take every core of the machine in every
    job, so jobs side by side would run several times more threads than cores.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    omp = os.environ.get("OMP_NUM_THREADS", "")
    return min(cores, int(omp)) if omp.isdigit() and int(omp) > 0 else cores


@dataclass
class Normalization:
    """Affine map between input coordinates and the unit box: ``unit = (x - center) / scale``.

    Attributes:
        center: (3,) float64 centre of the input's bounding box.
        scale: the bounding box's longest side (> 0).
    """

    center: np.ndarray
    scale: float

    @classmethod
    def of(cls, points: np.ndarray) -> Normalization:
        """The normalisation of (N, 3) points: bbox centre to the origin, longest side to 1."""
        lo, hi = points.min(0), points.max(0)
        return cls(center=(lo + hi) / 2, scale=float((hi - lo).max()))

    def to_unit(self, x: np.ndarray) -> np.ndarray:
        """(N, 3) input coordinates -> unit-box coordinates."""
        return (x - self.center) / self.scale

    def from_unit(self, x: np.ndarray) -> np.ndarray:
        """(N, 3) unit-box coordinates -> input coordinates."""
        return x * self.scale + self.center


def sample_triangles(
    vertices: np.ndarray, faces: np.ndarray, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Area-weighted uniform samples on a triangle mesh with the sampled faces' normals.

    Args:
        vertices: (V, 3) float. faces: (F, 3) int. n: number of samples. rng: numpy generator.

    Returns:
        points (n, 3) float64 and unit face normals (n, 3) float64 (zero-area faces are never
        drawn, so every normal is defined).
    """
    tri = vertices[faces]  # (F, 3, 3)
    origin = tri[:, 0]
    edge1, edge2 = tri[:, 1] - origin, tri[:, 2] - origin
    cross = np.cross(edge1, edge2)
    area2 = np.linalg.norm(cross, axis=1)
    if area2.sum() <= 0:
        raise ShapeError("mesh has zero surface area; cannot sample its surface")
    face = rng.choice(len(faces), size=n, p=area2 / area2.sum())
    # Uniform barycentrics by reflecting the unit square's upper triangle.
    u, v = rng.random(n), rng.random(n)
    flip = u + v > 1
    np.subtract(1, u, out=u, where=flip)
    np.subtract(1, v, out=v, where=flip)
    # Per-face edges and normals gathered row-wise (np.take) rather than whole triangles
    # indexed and differenced per sample: the same values and operations (bit-identical
    # samples for the same rng), about half the time at the 1M samples of the metrics.
    pts = np.take(origin, face, axis=0) + u[:, None] * np.take(edge1, face, axis=0)
    pts += v[:, None] * np.take(edge2, face, axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):  # zero-area faces are never drawn
        unit = cross / area2[:, None]
    return pts, np.take(unit, face, axis=0)


# Normals of a bare point cloud. Orientation propagates along a minimum spanning tree of the kNN
# graph whose edge cost is 1 - |n_i . n_j| (Hoppe et al. 1992): sign decisions travel where
# neighbouring planes agree best, so they cross a crease or jump between the two sides of a thin
# part only where the graph offers no better path, and never along an edge between stacked
# sheets (_sheet_edges). Each connected part of the graph is then turned outward as a whole, or
# inward where an odd number of the other parts enclose it (the inner wall of a hollow object;
# the winding number of the others counts them), and a subtree that the winding number shows
# reversed is flipped back (_reversed_subtrees). Measured on the seven benchmark shapes at 100k
# clean points (benchmarks/orientation_cpu.json): no normal flipped against the true one on
# four, 1-4 of 100k on the others, in about 1 s on two cores; the centroid rule it replaces
# fails on any surface that is not star-shaped (docs/training.md has the failures each later
# step mended).


def pca_normals(points: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
    """Unoriented unit normals: the least-variance axis of each point's neighbourhood.

    Args:
        points: (N, 3) float array. neighbours: (N, k) int indices (each row includes the
            point itself), k >= 3.

    Returns:
        (N, 3) float64 unit normals, signs arbitrary (any unit vector where a neighbourhood's
        points all coincide).
    """
    return smallest_eigenvectors(neighbourhood_covariances(points, neighbours))


# The six distinct entries of a symmetric 3 x 3 matrix, in the order 00 01 02 11 12 22, and
# where each entry of the full matrix sits among them.
_ROW, _COL = np.array([0, 0, 0, 1, 1, 2]), np.array([0, 1, 2, 1, 2, 2])
_FULL = np.array([[0, 1, 2], [1, 3, 4], [2, 4, 5]])


def neighbourhood_covariances(points: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
    """Scatter matrices of the points' neighbourhoods, divided by their size.

    Accumulated one neighbour column at a time about the row's first point (near the
    neighbourhood, so no precision is lost to coordinates far from the origin), on coordinate
    rows: about twice as fast as one (N, k, 3) gather and an einsum, and a fraction of its
    memory at k = 64.

    Args:
        points: (N, 3) float array. neighbours: (N, k) int indices, k >= 1.

    Returns:
        (N, 6) float64: entries 00 01 02 11 12 22 of each neighbourhood's covariance.
    """
    xyz = np.ascontiguousarray(np.asarray(points, dtype=np.float64).T)
    cols = np.ascontiguousarray(neighbours.T)
    anchor = xyz[:, cols[0]]
    s1 = np.zeros((3, len(neighbours)))
    s2 = np.zeros((6, len(neighbours)))
    d = np.empty((3, len(neighbours)))
    for col in cols[1:]:
        np.subtract(xyz[:, col], anchor, out=d)
        s1 += d
        for e, (i, j) in enumerate(zip(_ROW, _COL, strict=True)):
            s2[e] += d[i] * d[j]
    mean = s1 / len(cols)
    return (s2 / len(cols) - mean[_ROW] * mean[_COL]).T


def smallest_eigenvectors(cov: np.ndarray) -> np.ndarray:
    """Unit eigenvectors of the smallest eigenvalues of symmetric 3 x 3 matrices.

    In closed form: the eigenvalues from the trigonometric solution of the characteristic
    cubic, the vector as the longest cross product of two rows of (A - lambda I), which spans
    its null space. 2-5x faster than LAPACK's batched ``eigh`` (a general routine per
    matrix). The cross products lose precision as the two smallest eigenvalues close in, so
    matrices whose gap is under :data:`_CLOSED_FORM_GAP` of their spread go to ``eigh``
    instead (none of the benchmark inputs' neighbourhoods; a nearly straight line of points,
    or all in one place).

    Args:
        cov: (N, 6) float64 entries 00 01 02 11 12 22 (:func:`neighbourhood_covariances`).

    Returns:
        (N, 3) float64 unit vectors, signs arbitrary.
    """
    a00, a01, a02, a11, a12, a22 = cov.T
    q = (a00 + a11 + a22) / 3
    b00, b11, b22 = a00 - q, a11 - q, a22 - q
    p = np.sqrt((b00**2 + b11**2 + b22**2 + 2 * (a01**2 + a02**2 + a12**2)) / 6)
    det = b00 * (b11 * b22 - a12**2) - a01 * (a01 * b22 - a12 * a02) + a02 * (a01 * a12 - b11 * a02)
    with np.errstate(divide="ignore", invalid="ignore"):
        phi = np.arccos(np.where(p > 0, np.clip(det / (2 * p**3), -1.0, 1.0), 0.0)) / 3
    lam_max = q + 2 * p * np.cos(phi)
    lam_min = q + 2 * p * np.cos(phi + 2 * np.pi / 3)
    lam_mid = 3 * q - lam_max - lam_min
    full = cov[:, _FULL]
    rows = full - lam_min[:, None, None] * np.eye(3)
    cands = np.cross(rows[:, [0, 0, 1]], rows[:, [1, 2, 2]])
    norm2 = np.einsum("nci,nci->nc", cands, cands)
    best = norm2.argmax(1)
    at = np.arange(len(cov))
    with np.errstate(divide="ignore", invalid="ignore"):
        vec = cands[at, best] / np.sqrt(norm2[at, best])[:, None]
    doubtful = ~(lam_mid - lam_min > _CLOSED_FORM_GAP * (lam_max - lam_min))  # NaN: doubtful
    if doubtful.any():
        vec[doubtful] = np.linalg.eigh(full[doubtful])[1][:, :, 0]
    return vec


# Relative gap (lambda_mid - lambda_min) / (lambda_max - lambda_min) under which
# smallest_eigenvectors leaves the closed form: there its vectors are within 1e-10 radians of
# LAPACK's (random matrices of condition numbers up to 1e12, tests/test_geometry.py).
_CLOSED_FORM_GAP = 1e-3


def orient_normals(points: np.ndarray, normals: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
    """Consistently oriented copies of ``normals`` (minimum-spanning-tree propagation).

    Args:
        points: (N, 3) float array. normals: (N, 3) unit normals, signs arbitrary.
        neighbours: (N, k) int kNN indices, column 0 the point itself, k >= 2.

    Returns:
        (N, 3) float64 normals, consistent within each connected part of the kNN graph (less
        its edges between stacked sheets, :func:`_sheet_edges`) and outward (positive signed
        volume) per part, except that a part enclosed by an odd number of the others (the
        wall of a cavity: :func:`neusdf.winding.cavity_parts`) faces inward; then subtrees
        that the winding number shows reversed are flipped (:func:`_reversed_subtrees`).
    """
    n_pts, k = neighbours.shape
    src = np.repeat(np.arange(n_pts), k - 1)
    dst = neighbours[:, 1:].ravel()
    keep = _sheet_edges(points, neighbours).ravel()
    src, dst = src[keep], dst[keep]
    # +1e-9: an edge between parallel planes must still exist in the sparse graph
    cost = 1.0 - np.abs(np.einsum("ij,ij->i", normals[src], normals[dst])) + 1e-9
    graph = coo_matrix((cost, (src, dst)), shape=(n_pts, n_pts)).tocsr()
    tree = minimum_spanning_tree(graph.maximum(graph.T))
    tree = tree.maximum(tree.T)
    out = np.array(normals, dtype=np.float64, copy=True)
    n_parts, part = connected_components(tree, directed=False)
    # One breadth-first tree per part, all held in one parent array (a root is its own parent).
    parent = np.arange(n_pts)
    parts = [np.flatnonzero(part == c) for c in range(n_parts)]
    for members in parts:
        order, tree_parent = breadth_first_order(tree, int(members[0]), directed=False)
        parent[order[1:]] = tree_parent[order[1:]]
    # A child flips when it disagrees with its parent's original sign xor its parent flipped:
    # a point flips when the disagreements on its tree path to the root are odd.
    child = np.flatnonzero(parent != np.arange(n_pts))
    disagree = np.zeros(n_pts, dtype=bool)
    disagree[child] = np.einsum("ij,ij->i", out[child], out[parent[child]]) < 0
    out[_path_parity(disagree, parent)] *= -1
    for members in parts:
        # Outward as a whole: the part's signed volume (centred, so that an open part's value
        # does not depend on where the origin is) must be positive.
        centred = points[members] - points[members].mean(0)
        if np.einsum("ij,ij->", centred, out[members]) < 0:
            out[members] *= -1
    # Both winding-number steps below weigh each point by its area. (Imported here:
    # neusdf.winding imports this module.)
    from neusdf.winding import cavity_parts, point_areas

    areas = point_areas(points, neighbours=neighbours)
    if n_parts > 1:
        # ...except a part inside an odd number of others: the inner wall of a hollow shell
        # faces into its cavity.
        out[cavity_parts(points, out, part, areas=areas)[part]] *= -1
    out[_reversed_subtrees(points, out, parent, part, neighbours, areas)] *= -1
    return out


# The reversal test: probe points, the most points its winding numbers sum over, its offset
# along the normals (in median point spacings), and the fewest probes that must agree.
_PROBES = 128
_MAX_SOURCES = 10_000
_PROBE_OFFSET = 2.0
_MIN_REVERSED = 3
# ...and the smallest jump of the winding number across the surface, at a probe, that counts
# (1 where the sum resolves the surface; less where the offset points reach other sheets).
_MIN_JUMP = 0.25


def _reversed_subtrees(
    points: np.ndarray,
    normals: np.ndarray,
    parent: np.ndarray,
    part: np.ndarray,
    neighbours: np.ndarray,
    areas: np.ndarray,
) -> np.ndarray:
    """Points of spanning-tree subtrees whose normals the propagation reversed as a whole.

    One sign copied wrongly along a tree edge reverses everything below it: where the kNN
    graph joins two closed parts at a contact (two spheres a point spacing apart), a whole part
    comes out inside out, and the outward rule, which sees one part, cannot tell; nor can the
    cavity rule tell a cavity's wall that noise joined to the outer wall. The winding number
    can: for a solid whose normals face out it is 0 or 1 everywhere, so just off a point along
    its normal and just behind it the two sum to 1 (about 0 at open edges and thin parts). A
    reversed region sums to -1 (a part inside out: winding -1 within) or 3 (a cavity's wall
    facing out: winding 2 in the cavity). At up to :data:`_PROBES` points, each probe votes
    |sum / jump - 1| - 1 (clipped to [-1, 1]: +1 reversed, -1 right; jump, the difference of
    the two, is 1 in exact arithmetic and scales the sum's area errors away) for every tree
    node on its path to its root; the subtree (or the rest of its part) with the most votes is
    flipped if they reach :data:`_MIN_REVERSED`, and the test is taken again, at most three
    times. Offsets land 2 spacings of the summed points off the surface.

    Cost: one winding-number sum of 256 queries over at most 10k of the points (0.02-0.04 s
    for 100k points on two CPU cores, after torch's first call); the tree walk only where a
    probe flags a reversal.

    Args:
        points, normals: (N, 3) float arrays, the normals oriented along the tree.
        parent: (N,) int, each point's parent in the spanning forest (a root is its own).
        part: (N,) int, each point's tree (connected part) label.
        neighbours: (N, k) int kNN indices, column 0 the point itself.
        areas: (N,) float, each point's area (:func:`neusdf.winding.point_areas`).

    Returns:
        (N,) bool: the points to flip.
    """
    import torch

    from neusdf.winding import winding_number

    def f64(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float64)

    n_pts = len(points)
    flip = np.zeros(n_pts, dtype=bool)
    if n_pts < 4 * _MIN_REVERSED:
        return flip
    rng = np.random.default_rng(0)
    probe = np.sort(rng.choice(n_pts, min(_PROBES, n_pts), replace=False))
    # A random subset of the points stands for them all, each for thin = n_pts / len(src)
    # times its area, sqrt(thin) times as far apart (the offset must clear the sum's grain).
    src = np.arange(n_pts)
    if n_pts > _MAX_SOURCES:
        src = np.sort(rng.choice(n_pts, _MAX_SOURCES, replace=False))
    thin = n_pts / len(src)
    nearest = np.linalg.norm(points[neighbours[src, 1]] - points[src], axis=1)
    spacing = np.median(nearest) * thin**0.5
    src_areas = f64(areas[src] * thin)
    sources = f64(points[src])
    for _ in range(3):
        sign = np.where(flip, -1.0, 1.0)[:, None]
        off = _PROBE_OFFSET * spacing * sign[probe] * normals[probe]
        queries = f64(np.concatenate([points[probe] + off, points[probe] - off]))
        w = winding_number(queries, sources, f64(sign[src] * normals[src]), src_areas).numpy()
        w_out, w_in = w[: len(probe)], w[len(probe) :]
        # In units of the jump across the surface, which is 1 whatever the orientation: the
        # point areas of noisy input are off by up to 4x, and so is every winding number.
        jump = w_in - w_out
        resolved = jump > _MIN_JUMP
        vote = np.zeros(len(probe))
        ratio = (w_in[resolved] + w_out[resolved]) / jump[resolved]
        vote[resolved] = np.clip(np.abs(ratio - 1) - 1, -1.0, 1.0)
        if (vote > 0.5).sum() < _MIN_REVERSED:
            break
        # every node's score: the votes of the probes in its subtree (a walk up from each)
        score = np.zeros(n_pts)
        at, val = probe.copy(), vote.copy()
        while len(at):
            np.add.at(score, at, val)
            up = parent[at]
            moving = up != at
            at, val = up[moving], val[moving]
        inner = np.flatnonzero((score != 0) & (parent != np.arange(n_pts)))
        if not len(inner):
            break
        part_votes = np.bincount(part[probe], weights=vote, minlength=int(part.max()) + 1)
        gains = np.concatenate([score[inner], part_votes[part[inner]] - score[inner]])
        best = int(gains.argmax())
        if gains[best] < _MIN_REVERSED:
            break
        node = inner[best % len(inner)]
        bit = np.zeros(n_pts, dtype=bool)
        bit[node] = True
        region = _path_parity(bit, parent)  # the subtree of ``node``
        if best >= len(inner):  # the rest of its part
            region = (part == part[node]) & ~region
        flip ^= region
    return flip


# An edge runs between stacked sheets (the two walls of a thin shell) when its direction is
# within acos(0.8) = 37 degrees of either end's normal; along one sheet it is nearly tangent.
# 0.7, 0.6 and 0.5 did no better: they moved at most 7 normals of the other inputs (10k and
# 100k points, 0.06% of noisy ones), and a thin-walled tube's inner wall stays reversed on 2
# of 8 samples at 10k points at every value (docs/training.md).
STACKED_EDGE_COS = 0.8
# ...but a piece that dropping such edges cuts off keeps them when it has fewer points than
# this (or than 1% of the input): at creases and in noise, lone points would otherwise be
# oriented on their own.
MIN_SHEET_POINTS = 50


def _sheet_edges(points: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
    """Which kNN edges the orientation may follow: all but those between stacked sheets.

    The tree copies a normal's sign to a neighbour whose normal is parallel: right along a
    sheet, a coin toss across a gap, since the two walls of a thin shell have parallel normals
    of opposite orientation. Where the walls are closer than the neighbourhoods (a hollow
    sphere at 10k points) such edges turned a whole wall the wrong way; without them each wall
    is a part of its own, which the outward and cavity rules then orient.

    The test uses normals of the tree's own neighbourhoods (``neighbours``, 10 points from
    :func:`estimate_normals`), not the caller's (16): the larger neighbourhoods of points
    next to the other wall span both walls, and their normals, tilted up to 90 degrees, let
    bridging edges pass. An edge whose removal would only cut off a small piece is kept.

    Args:
        points: (N, 3) float array. neighbours: (N, k) int kNN indices, column 0 the point.

    Returns:
        (N, k - 1) bool, True for the edges (i, neighbours[i, j + 1]) to keep (all of them
        when k < 3).
    """
    n_pts, k = neighbours.shape
    if k < 3:
        return np.ones((n_pts, k - 1), dtype=bool)
    # Coordinate rows, one neighbour column at a time: a third of the time of (E, 3) arrays.
    xyz = np.ascontiguousarray(np.asarray(points, dtype=np.float64).T)
    nrm = np.ascontiguousarray(pca_normals(points, neighbours).T)
    keep = np.empty((k - 1, n_pts), dtype=bool)
    for j, col in enumerate(np.ascontiguousarray(neighbours[:, 1:].T)):
        d = xyz[:, col] - xyz
        along = np.maximum(np.abs((d * nrm).sum(0)), np.abs((d * nrm[:, col]).sum(0)))
        # |cos| < 0.8 without a square root (and a duplicate point, d = 0, is kept)
        keep[j] = along**2 <= STACKED_EDGE_COS**2 * (d * d).sum(0)
    keep = np.ascontiguousarray(keep.T)
    if keep.all():
        return keep
    src = np.repeat(np.arange(n_pts), k - 1)[keep.ravel()]
    dst = neighbours[:, 1:][keep]
    graph = coo_matrix((np.ones(len(src)), (src, dst)), shape=(n_pts, n_pts))
    _, piece = connected_components(graph, directed=False)
    small = np.bincount(piece)[piece] < max(MIN_SHEET_POINTS, n_pts // 100)
    return keep | small[:, None] | small[neighbours[:, 1:]]


def _path_parity(bit: np.ndarray, parent: np.ndarray) -> np.ndarray:
    """For every node of a forest, the XOR of ``bit`` over the edges of its path to its root.

    Pointer jumping: after round r each node holds the XOR over the edges to its 2^r-th
    ancestor and points there, so log2(depth) rounds of array operations replace a Python
    loop over the nodes (a spanning tree of a scan's kNN graph can be thousands of levels
    deep).

    Args:
        bit: (N,) bool, the value on the edge from each node to its parent (ignored at roots).
        parent: (N,) int, each node's parent; a root is its own parent.

    Returns:
        (N,) bool: the path XOR (False at the roots).
    """
    root = parent == np.arange(len(parent))
    acc = bit & ~root
    up = parent.copy()
    todo = np.flatnonzero(~root[up])
    while len(todo):
        anc = up[todo]
        acc[todo] ^= acc[anc]
        up[todo] = up[anc]
        todo = todo[~root[up[todo]]]
    return acc


def estimate_normals(points: np.ndarray, k: int = 16, k_tree: int = 10) -> np.ndarray:
    """Consistently oriented normals of a bare point cloud (see the comment above).

    PCA over ``k`` neighbours, orientation along a tree over the ``k_tree`` nearest.

    Args:
        points: (N, 3) float array with N >= 3.

    Returns:
        (N, 3) float64 consistently oriented unit normals.
    """
    k = max(3, min(k, len(points)))
    _, nn = cKDTree(points).query(points, k=k, workers=host_threads())
    normals = pca_normals(points, nn)
    return orient_normals(points, normals, nn[:, : max(2, min(k_tree, k))])


@dataclass(frozen=True)
class InputStats:
    """What a run measures of its input, in unit-box units.

    Attributes:
        num_points: size of the surface sample.
        spacing: median distance from a point to its nearest neighbour.
        noise: median RMS distance of a point's 16 nearest neighbours to their best-fit plane
            (position noise, plus a little curvature).
        has_normals: whether the input came with normals.
    """

    num_points: int
    spacing: float
    noise: float
    has_normals: bool

    @property
    def noise_ratio(self) -> float:
        """Noise over spacing: ~0.1 for clean samples, >~ 0.5 once noise blurs the sampling."""
        return self.noise / max(self.spacing, 1e-12)


# Points that the measurement looks at: the medians are stable long before this.
_MEASURE_SAMPLE = 20_000


def measure_points(points: np.ndarray, has_normals: bool, seed: int = 0) -> InputStats:
    """Spacing and noise level of a surface sample (a random subset of up to 20k points).

    Args:
        points: (N, 3) float array in unit-box coordinates, N >= 4.
        has_normals: recorded as is.
    """
    rng = np.random.default_rng(seed)
    sub = (
        points
        if len(points) <= _MEASURE_SAMPLE
        else points[rng.choice(len(points), _MEASURE_SAMPLE, replace=False)]
    )
    d, nn = cKDTree(points).query(sub, k=min(17, len(points)), workers=host_threads())
    nb = points[nn[:, 1:]]
    nb = nb - nb.mean(1, keepdims=True)
    smallest = np.linalg.eigvalsh(np.einsum("nki,nkj->nij", nb, nb) / nb.shape[1])[:, 0]
    return InputStats(
        num_points=len(points),
        spacing=float(np.median(d[:, 1])),
        noise=float(np.median(np.sqrt(np.maximum(smallest, 0.0)))),
        has_normals=has_normals,
    )
