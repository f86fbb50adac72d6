"""OmegaConf resolvers used by the Hydra configs in ``configs/``."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

__all__ = ["register_resolvers", "on_gpu"]

ROOT = Path(__file__).resolve().parents[1]


def on_gpu(accelerator: str) -> bool:
    """Whether a Lightning ``accelerator`` setting ends up on a CUDA GPU on this machine."""
    if accelerator in ("gpu", "cuda"):
        return True
    return accelerator == "auto" and torch.cuda.is_available()


def register_resolvers() -> None:
    """Registers ``${gpu_or_cpu:ACCEL,A,B}`` and ``${neusdf_root:}`` (idempotent).

    ``gpu_or_cpu`` sizes defaults for the device the run will use: A on a GPU, B on the CPU.
    ``neusdf_root`` is the repository root (where ``configs/`` and ``data/`` live).
    """
    OmegaConf.register_new_resolver(
        "gpu_or_cpu", lambda acc, gpu, cpu: gpu if on_gpu(str(acc)) else cpu, replace=True
    )
    OmegaConf.register_new_resolver("neusdf_root", lambda: str(ROOT), replace=True)
