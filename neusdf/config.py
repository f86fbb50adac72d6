"""OmegaConf resolvers used by the Hydra configs in ``configs/``."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

__all__ = ["register_resolvers", "on_gpu", "compose_train_config"]

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


def compose_train_config(overrides: list[str], output_dir: str | Path) -> DictConfig:
    """The config ``train.py`` would run with these overrides, outside ``@hydra.main``.

    For programmatic runs (benchmarks, tests): ``paths.output_dir`` normally comes from
    Hydra's runtime, which only exists inside ``@hydra.main``, so it is set to ``output_dir``.

    Args:
        overrides: Hydra override strings, e.g. ``["model.K=8", "trainer.max_steps=100"]``.
        output_dir: the run directory (checkpoints, mesh, metrics).

    Raises:
        hydra.errors.ConfigCompositionException: unknown keys or groups, naming them.
    """
    from hydra import compose, initialize_config_dir

    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg
