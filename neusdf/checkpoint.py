"""Checkpoints: compatibility with a run's model config, and rebuilding the SDF from one.

A checkpoint written by :class:`neusdf.module.SDFModule` carries everything needed to rebuild
the SDF without the training data: the model config (``hyper_parameters.model``), the number
of neural points (under :data:`META_KEY`) and the unit-box normalisation (the ``center`` and
``scale`` buffers), so :func:`load_checkpoint` works on any machine and number of devices.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from neusdf.geometry import Normalization
from neusdf.model import NeuralPointSDF

__all__ = [
    "META_KEY",
    "NET_PREFIX",
    "CheckpointError",
    "LoadedSDF",
    "check_compatible",
    "load_checkpoint",
]

# The checkpoint entry holding what the net's rebuild needs beyond its config.
META_KEY = "neusdf"
# State-dict keys of the SDF network (the module's ``net`` attribute).
NET_PREFIX = "net."
# Model options that do not change the parameters' meaning: a checkpoint loads across them.
_PORTABLE_MODEL_KEYS = {"backend", "chunk", "seed", "_target_"}


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or from another model configuration."""


def check_compatible(checkpoint: dict, model_cfg: dict, num_points: int | None) -> None:
    """Raises :class:`CheckpointError` when ``checkpoint`` was trained with another model.

    Args:
        checkpoint: a loaded Lightning checkpoint dict.
        model_cfg: the model config of this run. num_points: this run's P (None: any).
    """
    theirs = dict(checkpoint.get("hyper_parameters", {}).get("model", {}))
    if not theirs or META_KEY not in checkpoint:
        raise CheckpointError("the checkpoint was not written by neusdf's SDFModule")
    diffs = [
        f"model.{k}: checkpoint {theirs.get(k)!r}, this run {model_cfg.get(k)!r}"
        for k in sorted(set(theirs) | set(model_cfg))
        if k not in _PORTABLE_MODEL_KEYS and theirs.get(k) != model_cfg.get(k)
    ]
    theirs_p = checkpoint[META_KEY]["num_points"]
    if num_points is not None and theirs_p != num_points:
        diffs.append(f"neural points: checkpoint {theirs_p}, this run {num_points}")
    if diffs:
        raise CheckpointError(
            "the checkpoint comes from another model configuration:\n  " + "\n  ".join(diffs)
        )


@dataclass
class LoadedSDF:
    """An SDF rebuilt from a checkpoint: the net (eval mode), normalisation and domain box."""

    net: NeuralPointSDF
    normalization: Normalization
    box: float


def load_checkpoint(
    path: str | Path, device: str | torch.device = "cpu", backend: str | None = None
) -> LoadedSDF:
    """Rebuilds the SDF of a checkpoint on ``device`` (any device count; no data needed).

    Args:
        path: a ``.ckpt`` written by training. device: where to put the net.
        backend: override the op backend ('compiled' or 'reference'); default: the stored one.

    Raises:
        CheckpointError: missing/unreadable file or not a neusdf checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"ckpt: file '{path}' does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # pickle/zip errors vary; name the file instead
        raise CheckpointError(f"ckpt: '{path}' could not be read as a checkpoint ({e})") from e
    if not isinstance(ckpt, dict) or META_KEY not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(f"ckpt: '{path}' was not written by neusdf's SDFModule")
    hp = ckpt["hyper_parameters"]
    model_cfg = OmegaConf.create(dict(hp["model"]))
    if backend is not None:
        model_cfg.backend = backend
    net = instantiate(model_cfg, num_points=ckpt[META_KEY]["num_points"], init=None)
    state = {
        k.removeprefix(NET_PREFIX): v
        for k, v in ckpt["state_dict"].items()
        if k.startswith(NET_PREFIX)
    }
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"ckpt: '{path}' does not match its own model config ({e})") from e
    sd = ckpt["state_dict"]
    norm = Normalization(sd["center"].numpy(), float(sd["scale"]))
    return LoadedSDF(net.to(device).eval(), norm, float(hp["sampling"]["box"]))
