"""Checkpoints: compatibility with a run's model config, and rebuilding the SDF from one.

A checkpoint written by :class:`neusdf.module.SDFModule` carries everything needed to rebuild
the SDF without the training data: the model config (``hyper_parameters.model``), the number
of neural points (under :data:`META_KEY`) and the unit-box normalisation (the ``center`` and
``scale`` buffers), so :func:`load_checkpoint` works on any machine and number of devices.

It also records what it was trained on (under :data:`DATA_KEY`, see :func:`data_record`): the
data's path and a fingerprint of the shape and its normalisation. Resuming on other data is
refused by :func:`check_same_data` unless asked for explicitly.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from neusdf.geometry import Normalization
from neusdf.model import NeuralPointSDF

__all__ = [
    "DATA_KEY",
    "META_KEY",
    "NET_PREFIX",
    "CheckpointError",
    "LoadedSDF",
    "check_compatible",
    "check_same_data",
    "data_record",
    "load_checkpoint",
    "read_checkpoint",
]

log = logging.getLogger(__name__)

# The checkpoint entry holding what the net's rebuild needs beyond its config.
META_KEY = "neusdf"
# The checkpoint entry recording the training data (written by neusdf.callbacks.RunRecorder).
DATA_KEY = "neusdf_data"
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


def data_record(path: str, shape, normalization: Normalization) -> dict:
    """What a checkpoint records about its training data.

    Args:
        path: the data file as given. shape: the loaded :class:`neusdf.mesh_io.Shape`.
        normalization: its unit-box normalisation.

    Returns:
        ``{"path": absolute path, "fingerprint": sha256 prefix of the points, normals, faces
        and normalisation}``: the same file content gives the same fingerprint anywhere.
    """
    h = hashlib.sha256()
    for a in (shape.points, shape.normals, shape.faces):
        if a is None:
            h.update(b"none")
        else:
            a = np.ascontiguousarray(a)
            h.update(str((a.dtype.str, a.shape)).encode())
            h.update(a.tobytes())
    h.update(np.asarray(normalization.center, dtype=np.float64).tobytes())
    h.update(np.float64(normalization.scale).tobytes())
    return {"path": str(Path(path).resolve()), "fingerprint": h.hexdigest()[:16]}


def check_same_data(checkpoint: dict, record: dict, allow_other: bool = False) -> None:
    """Raises :class:`CheckpointError` when ``checkpoint`` was trained on other data.

    Args:
        checkpoint: a loaded checkpoint dict. record: this run's :func:`data_record`.
        allow_other: only warn (the user asked for it with ``resume_other_data=true``).
    """
    theirs = checkpoint.get(DATA_KEY)
    if theirs is None:
        log.warning("the checkpoint does not record its training data: not checked")
        return
    if theirs.get("fingerprint") == record["fingerprint"]:
        return
    msg = (
        f"the checkpoint was trained on '{theirs.get('path')}' "
        f"(fingerprint {theirs.get('fingerprint')}), this run's data is '{record['path']}' "
        f"(fingerprint {record['fingerprint']})"
    )
    if allow_other:
        log.warning("%s; continuing on this run's data (resume_other_data=true)", msg)
        return
    raise CheckpointError(
        f"{msg}; pass data.path={theirs.get('path')} to continue on the same data, or "
        "resume_other_data=true to continue on this run's data"
    )


def read_checkpoint(path: str | Path) -> dict:
    """Loads a neusdf checkpoint dict on the CPU; :class:`CheckpointError` names the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"ckpt: file '{path}' does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # pickle/zip errors vary; name the file instead
        raise CheckpointError(f"ckpt: '{path}' could not be read as a checkpoint ({e})") from e
    if not isinstance(ckpt, dict) or META_KEY not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(f"ckpt: '{path}' was not written by neusdf's SDFModule")
    return ckpt


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
    ckpt = read_checkpoint(path)
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
