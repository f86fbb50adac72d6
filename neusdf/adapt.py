"""Settings that follow the input: the config's ``auto`` values, chosen from what was measured.

One default config serves clean, sparse, noisy and normal-less input. The run measures its
input (:func:`neusdf.geometry.measure_points`) and fills every ``auto`` value from that; a value
given explicitly (on the command line or by an ``experiment=`` preset) is kept as it is.

The rule, and why:

- Noise. Position noise shows as the RMS distance of a point's neighbours to their best-fit
  plane. Clean samples measure about 0.05-0.2 of the point spacing (curvature; sparse input
  sits at the top of that range), Gaussian noise of 0.2% of the shape's size or more measures
  0.5 or above. Past ``NOISY_RATIO`` the input counts as noisy: the surface loss is weakened
  (10 -> 1) and the Eikonal one strengthened (0.1 -> 1) so that the SDF trusts the normals and
  its own smoothness more than the scattered positions, and fewer neural points (8192 instead
  of 16384 on a GPU) are given, so that the surface cannot follow the noise. The surface and
  point counts were chosen among three candidates on noisy bunny and fandisk and confirmed on
  rocker-arm; the Eikonal weight was raised from 0.5 later, chosen among four changes on the
  noisy bunny, fandisk and held-out rod (whose normal consistency missed Poisson's at 0.5) and
  confirmed on the eleven other noisy shapes of the two quality tables (docs/training.md;
  ``configs/experiment/noisy.yaml`` keeps these values as an explicit preset).
- Normals: estimated and oriented when missing (:class:`neusdf.data.ShapeDataModule`), then
  used like the file's. The PCA takes 16 neighbours, or 64 for noisy input: noise as large as
  the point spacing tilts the best-fit plane of 16 points by about 30 degrees on average and
  turned 2-8% of the benchmark shapes' normals the wrong way; over 64 points the tilt is about
  10 degrees and at most 0.9% point the wrong way (0.13% leaving armadillo aside). Chosen among
  16, 32 and 64 on the noisy bunny and fandisk with their normals dropped, confirmed on the
  other twelve shapes of the two quality tables (``benchmarks/orientation.py``,
  docs/training.md).
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig, OmegaConf, open_dict

from neusdf.config import on_gpu
from neusdf.geometry import InputStats

__all__ = [
    "AUTO",
    "NOISY_RATIO",
    "auto_settings",
    "is_noisy",
    "normal_neighbours",
    "resolve_auto",
]

log = logging.getLogger(__name__)

AUTO = "auto"
# Noise / spacing ratio from which the input is treated as noisy (see the module docstring:
# clean inputs measured <= 0.22 on the benchmark shapes, noise of 0.2% of the size >= 0.54).
NOISY_RATIO = 0.4


def is_noisy(stats: InputStats) -> bool:
    """Whether an input that measured ``stats`` counts as noisy (``NOISY_RATIO``)."""
    return stats.noise_ratio >= NOISY_RATIO


def auto_settings(stats: InputStats, gpu: bool) -> dict[str, float | int]:
    """The value of each adaptive key for an input that measured ``stats``.

    Returns:
        dotted config key -> value.
    """
    noisy = is_noisy(stats)
    return {
        "model.num_points": (8192 if noisy else 16384) if gpu else 2048,
        "loss.surface": 1.0 if noisy else 10.0,
        "loss.eikonal": 1.0 if noisy else 0.1,
    }


def normal_neighbours(stats: InputStats) -> int:
    """Points in the PCA neighbourhood of normals estimated for an input that measured
    ``stats``: 64 for noisy input, 16 otherwise (see the module docstring)."""
    return 64 if is_noisy(stats) else 16


def resolve_auto(cfg: DictConfig, stats: InputStats) -> dict[str, float | int]:
    """Replaces each ``auto`` value of ``cfg`` (in place) by :func:`auto_settings`' choice.

    Logs the measurement and every choice. Returns the keys that were filled, with values.
    """
    chosen = auto_settings(stats, on_gpu(str(cfg.trainer.accelerator)))
    filled = {k: v for k, v in chosen.items() if OmegaConf.select(cfg, k) == AUTO}
    with open_dict(cfg):
        for key, value in filled.items():
            OmegaConf.update(cfg, key, value)
    kind = "noisy" if is_noisy(stats) else "clean"
    log.info(
        "input: %d points, spacing %.2e, noise %.2e (%.2f of the spacing: %s), normals %s",
        stats.num_points,
        stats.spacing,
        stats.noise,
        stats.noise_ratio,
        kind,
        "from the file" if stats.has_normals else "estimated",
    )
    if filled:
        log.info("auto settings: %s", ", ".join(f"{k}={v}" for k, v in filled.items()))
    return filled
