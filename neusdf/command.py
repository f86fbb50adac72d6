"""The training command line (``train.py``, ``neusdf-train``): Hydra's entry point.

    python train.py data.path=scan.ply trainer.max_steps=3000
    python train.py -m hydra/launcher=local data.path=a.ply,b.ply    # many shapes at once

This module is light on purpose: it imports Hydra and the config, and the training pipeline
(:mod:`neusdf.pipeline`: torch, Lightning, trimesh) only when a job runs.
A multirun whose launcher starts worker processes (``hydra/launcher=local`` with several
jobs side by side) then never imports the pipeline in the command's own process, so the
workers' imports, several seconds each, start at once instead of after the command's.

Before the run is accepted nothing is written into the run directory: the config and log
files Hydra would write are held back until :func:`neusdf.pipeline.train` has checked
everything (see :class:`_RunFiles`).
"""

from __future__ import annotations

import difflib
import gc
import logging
import logging.handlers
import os
import re
import sys
import time
from pathlib import Path
from types import ModuleType

import hydra
from omegaconf import DictConfig, OmegaConf

from neusdf.config import CONFIG_DIR, compose_config, is_main_process, register_resolvers
from neusdf.process_info import process_started_at

__all__ = ["main"]

log = logging.getLogger("neusdf.train")
# the config's resolvers (e.g. ${gpu_jobs:2}, which sizes the local launcher) must exist
# before Hydra composes, in this process too
register_resolvers()

# When this process started: a run directory created after it (by Hydra) and left empty by a
# refusal is removed again.
_STARTED = time.time()


def _import_pipeline() -> ModuleType:
    """Imports :mod:`neusdf.pipeline` (once per process) with the cyclic garbage collector
    held off, and returns it.

    The command's one hold: nothing before it imports torch (see :mod:`neusdf.config`).
    Importing torch and Lightning leaves ~400k objects that live as long as the process;
    while they pile up, every full collection walks them all again (~1.1 s of a ~3.9 s import
    on a 2-core CPU machine), and so does the collection at exit (~1 s). Importing makes no
    garbage worth that: collection waits until the import is done, and ``gc.freeze`` then
    puts the imported objects out of its reach (later collections walk only what the run
    creates).
    """
    if "neusdf.pipeline" in sys.modules:
        return sys.modules["neusdf.pipeline"]
    enabled = gc.isenabled()
    gc.disable()
    try:
        import neusdf.pipeline as pipeline
    finally:
        gc.freeze()
        if enabled:
            gc.enable()
    return pipeline


class _RunFiles:
    """The command line's files in the run directory, written only once the run is accepted.

    Hydra is configured (``configs/hydra/default.yaml``) to write nothing itself: no
    ``.hydra/`` output subdirectory and no log file handler. Records logged before acceptance
    are held in memory; :meth:`accept` writes ``.hydra/{config,hydra,overrides}.yaml`` (as
    Hydra would have) and ``<job name>.log`` with the held records. :meth:`refuse` drops them
    and leaves the directory as it was (one Hydra created for this run and left empty is
    removed).
    """

    FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"

    def __init__(self, cfg: DictConfig) -> None:
        from hydra.core.hydra_config import HydraConfig

        self.cfg = cfg
        self.hydra = HydraConfig.get()
        self.out_dir = Path(self.hydra.runtime.output_dir)
        self.held = logging.handlers.MemoryHandler(
            capacity=1 << 20, flushLevel=logging.CRITICAL + 1
        )
        logging.getLogger().addHandler(self.held)

    def accept(self) -> None:
        root = logging.getLogger()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        log_file = logging.FileHandler(self.out_dir / f"{self.hydra.job.name}.log")
        log_file.setFormatter(logging.Formatter(self.FORMAT))
        self.held.setTarget(log_file)
        self.held.flush()
        root.removeHandler(self.held)
        root.addHandler(log_file)
        if is_main_process():
            sub = self.out_dir / ".hydra"
            sub.mkdir(exist_ok=True)
            OmegaConf.save(self.cfg, sub / "config.yaml")
            OmegaConf.save(
                OmegaConf.create({"hydra": OmegaConf.to_container(self.hydra)}), sub / "hydra.yaml"
            )
            OmegaConf.save(
                OmegaConf.create(list(self.hydra.overrides.task)), sub / "overrides.yaml"
            )

    def refuse(self) -> None:
        logging.getLogger().removeHandler(self.held)
        self.held.setTarget(None)
        self.held.buffer.clear()
        try:
            if self.out_dir.stat().st_ctime >= _STARTED - 1 and not any(self.out_dir.iterdir()):
                self.out_dir.rmdir()
        except OSError:
            pass


def _unknown_key(overrides: list[str]) -> str | None:
    """The one-line error for an override of a key the config does not have, naming the
    nearest key that exists; None when the overrides compose (or fail for another reason,
    which Hydra then reports itself)."""
    from hydra.errors import ConfigCompositionException

    try:
        compose_config("train", overrides)
        return None
    except ConfigCompositionException as e:
        m = re.search(r"Could not override '([\w.]+)'", str(e))
        if m is None or "To append to your config" not in str(e):
            return None
        key = m.group(1)
    except Exception:  # anything else: Hydra's own report
        return None
    rest = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != key]
    try:
        cfg = compose_config("train", rest)
    except Exception:
        return None
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    keys = [str(k) for k in node.keys()] if isinstance(node, DictConfig) else []
    close = difflib.get_close_matches(leaf, keys, n=1, cutoff=0.5)
    hint = f"; did you mean {parent + '.' if parent else ''}{close[0]}?" if close else ""
    return f"{key} is not a config key{hint} (+{key}=... adds a new key)"


def _torchrun_without_run_dir(args: list[str]) -> bool:
    """Whether this is one of several ranks started by torchrun without ``hydra.run.dir``.

    Each rank composes its own config, and the default run directory is named after the
    second the rank started: ranks would disagree on it.
    """
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    started_by_torchrun = "TORCHELASTIC_RUN_ID" in os.environ
    return (
        started_by_torchrun and ranks > 1 and not any(a.startswith("hydra.run.dir=") for a in args)
    )


def main() -> None:
    """Command-line entry: an unknown config key is one line naming the nearest valid one
    (checked before Hydra starts), a torchrun launch without a shared run directory is
    refused; then :func:`_hydra_main`."""
    args = sys.argv[1:]
    if _torchrun_without_run_dir(args):
        print(
            "error: under torchrun every rank must write to the same run directory: pass "
            "hydra.run.dir=<dir>",
            file=sys.stderr,
        )
        sys.exit(1)
    plain = [a for a in args if not a.startswith(("hydra.", "hydra/", "+hydra", "~hydra"))]
    if args and not any(a.startswith("-") for a in args):
        msg = _unknown_key(plain)
        if msg is not None:
            print(f"error: {msg}", file=sys.stderr)
            sys.exit(1)
    _hydra_main()


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def _hydra_main(cfg: DictConfig) -> None:
    """Hydra entry point: runs :func:`neusdf.pipeline.train`, turning bad input into a
    one-line error."""
    entered, t0 = time.time(), time.perf_counter()
    train = _import_pipeline().train
    # How this job's process got here, recorded in the job's metrics.json: its id and start, when
    # Hydra called this function (after composing the job's config) and the pipeline's import
    # (only the process's first job pays it). The start is read here, not kept in a module
    # global: a launcher that pickles this function, as joblib's does, would carry the
    # command's own value into its workers.
    startup = {
        "process_id": os.getpid(),
        "process_started_at": process_started_at(),
        "job_function_at": entered,
        "pipeline_import_seconds": time.perf_counter() - t0,
    }
    from neusdf.checkpoint import CheckpointError
    from neusdf.mesh_io import ShapeError

    files = _RunFiles(cfg)
    accepted = False

    def accept() -> None:
        nonlocal accepted
        accepted = True
        files.accept()

    try:
        train(cfg, on_accept=accept, startup=startup)
    except (ShapeError, CheckpointError, FileExistsError, ValueError) as e:
        if os.environ.get("NEUSDF_DEBUG") == "1":
            raise
        log.error("error: %s", e)
        sys.exit(1)
    finally:
        if not accepted:
            files.refuse()
