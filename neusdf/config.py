"""Where the Hydra configs live, the resolvers they use, composing them, and runtime settings.

From a source checkout the configs and the default shape are the checkout's ``configs/`` and
``data/``; an installed wheel carries them inside the package (``neusdf/configs``,
``neusdf/assets``).

torch is imported inside the functions that need it: the command line (:mod:`neusdf.command`)
imports this module before a job runs and must stay light (torch comes with the pipeline).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf, open_dict

__all__ = [
    "CONFIG_DIR",
    "DATA_DIR",
    "compose_config",
    "compose_train_config",
    "configure_runtime",
    "is_main_process",
    "on_gpu",
    "project_root",
    "register_resolvers",
]

PACKAGE_DIR = Path(__file__).resolve().parent
# An installed wheel holds configs/ inside the package; a checkout beside it.
_INSTALLED = (PACKAGE_DIR / "configs").is_dir()
CONFIG_DIR = PACKAGE_DIR / "configs" if _INSTALLED else PACKAGE_DIR.parent / "configs"
DATA_DIR = PACKAGE_DIR / "assets" if _INSTALLED else PACKAGE_DIR.parent / "data"


def project_root() -> Path:
    """Where runs write ``outputs/``: the checkout's root, or the working directory when
    neusdf is installed as a package."""
    return Path.cwd() if _INSTALLED else PACKAGE_DIR.parent


class _DropLightningTips(logging.Filter):
    """Drops Lightning's advertising tips (the litlogger one at every Trainer start)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("\N{ELECTRIC LIGHT BULB} Tip:")


_TIPS_FILTER = _DropLightningTips()


def configure_runtime(deterministic: bool = False) -> None:
    """Process-wide settings of every training run, from the command line or from Python.

    - float32 matrix products may use TF32 tensor cores on GPUs (``"high"`` precision), or
      full float32 with ``deterministic``;
    - ``NCCL_NVLS_ENABLE=0`` unless already set: NVLink multicast stays off in NCCL, because a
      job using it can put a shared multi-GPU host's GPUs out of service. Set before any
      process group starts (DDP ranks inherit the environment);
    - Lightning's tips (an advertisement for its cloud logger) are dropped from its log.
    """
    import torch

    torch.set_float32_matmul_precision("highest" if deterministic else "high")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    rank_zero_log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if _TIPS_FILTER not in rank_zero_log.filters:
        rank_zero_log.addFilter(_TIPS_FILTER)


def on_gpu(accelerator: str) -> bool:
    """Whether a Lightning ``accelerator`` setting ends up on a CUDA GPU on this machine."""
    if accelerator in ("gpu", "cuda"):
        return True
    import torch

    return accelerator == "auto" and torch.cuda.is_available()


def _gpu_jobs(per_gpu: int) -> int:
    import torch

    count = torch.cuda.device_count()
    return int(per_gpu) * count if count else 1


def register_resolvers() -> None:
    """Registers ``${gpu_or_cpu:ACCEL,A,B}``, ``${gpu_jobs:N}``, ``${neusdf_root:}`` and
    ``${neusdf_data:}``.

    ``gpu_or_cpu`` sizes defaults for the device the run will use: A on a GPU, B on the CPU.
    ``gpu_jobs`` is N jobs side by side for each visible CUDA device, 1 on a machine without.
    ``neusdf_root`` is :func:`project_root`; ``neusdf_data`` the folder of the default shape.
    Idempotent.
    """
    OmegaConf.register_new_resolver(
        "gpu_or_cpu", lambda acc, gpu, cpu: gpu if on_gpu(str(acc)) else cpu, replace=True
    )
    OmegaConf.register_new_resolver("gpu_jobs", _gpu_jobs, replace=True)
    OmegaConf.register_new_resolver("neusdf_root", lambda: str(project_root()), replace=True)
    OmegaConf.register_new_resolver("neusdf_data", lambda: str(DATA_DIR), replace=True)


def compose_config(name: str, overrides: list[str]) -> DictConfig:
    """The config ``configs/<name>.yaml`` with Hydra ``overrides``, outside ``@hydra.main``.

    Raises:
        hydra.errors.ConfigCompositionException: unknown keys or groups, naming them.
    """
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


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
    cfg = compose_config("train", overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


def is_main_process() -> bool:
    """True except in the extra ranks Lightning starts for DDP (they share rank 0's run)."""
    return (
        int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0
    )
