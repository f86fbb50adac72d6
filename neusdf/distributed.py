"""Connecting the ranks of a torchrun launch while the data loads.

Under DDP, Lightning creates the process group when ``trainer.fit`` starts: every rank waits
there for the others, and NCCL then creates its communicator (about 0.5 s on two GPUs of one
host; measured with ``benchmarks/scale_out.py``). When torchrun started every rank at once,
the group can be created before that instead, in a background thread, while the ranks load
their data and build their models; Lightning finds the group created and keeps it
(``torch.distributed.is_initialized()``). Lightning's own launcher starts the other ranks
only inside ``fit``, so there is nothing to overlap and this does nothing.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from neusdf.config import on_gpu

__all__ = ["EarlyConnect", "start_early_connect"]

log = logging.getLogger(__name__)

_DDP_STRATEGY = "lightning.pytorch.strategies.DDPStrategy"


class EarlyConnect:
    """Creates the default process group in a daemon thread (``backend``, this rank's
    ``device`` for NCCL or None); :meth:`wait` joins it."""

    def __init__(self, backend: str, device: torch.device | None) -> None:
        self.backend, self.device = backend, device
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._connect, name="neusdf-connect", daemon=True)
        self._thread.start()

    def _connect(self) -> None:
        try:
            # RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT come from torchrun's environment;
            # with device_id NCCL creates its communicator now, not at the first collective
            dist.init_process_group(self.backend, device_id=self.device)
        except BaseException as e:  # re-raised in the main thread by wait()
            self._error = e

    def wait(self) -> float:
        """Blocks until the group exists; returns the seconds it blocked.

        Raises:
            RuntimeError: the group could not be created (the cause chained).
        """
        t0 = time.perf_counter()
        self._thread.join()
        if self._error is not None:
            raise RuntimeError(
                f"connecting the DDP ranks ({self.backend}) failed: {self._error}"
            ) from self._error
        # Lightning destroys the group at exit only when it created the group itself
        atexit.register(_destroy)
        return time.perf_counter() - t0


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def start_early_connect(cfg: DictConfig) -> EarlyConnect | None:
    """Starts connecting the ranks when torchrun launched a DDP run (None otherwise), and on
    GPUs makes this rank's GPU the current device, so that the build's GPU work (the winding
    grid) runs there instead of every rank's on GPU 0.

    Only where this rank's device is the one Lightning will give it: ``trainer.devices`` a
    count or ``auto``/``-1`` (device = the local rank); an explicit device list is left to
    Lightning, as is every run that torchrun did not start.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return None
    if str((cfg.trainer.get("strategy") or {}).get("_target_", "")) != _DDP_STRATEGY:
        return None
    devices = cfg.trainer.devices
    if not (isinstance(devices, int) or str(devices) in ("auto", "-1")):
        return None
    if dist.is_initialized():
        return None
    local_rank = int(os.environ["LOCAL_RANK"])
    gpu = on_gpu(str(cfg.trainer.accelerator)) and torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if gpu else None
    if device is not None:
        torch.cuda.set_device(device)
    log.info("connecting the DDP ranks while the data loads (rank %s)", os.environ.get("RANK"))
    return EarlyConnect("nccl" if gpu else "gloo", device)
