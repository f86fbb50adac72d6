"""DDP helpers: connecting the ranks of a torchrun launch while the data loads, and a
per-step SIGTERM check that does not wait for the GPU.

Under DDP, Lightning creates the process group when ``trainer.fit`` starts: every rank waits
there for the others, and NCCL then creates its communicator (about 0.5 s on two GPUs of one
host; measured with ``benchmarks/scale_out.py``). When torchrun started every rank at once,
the group can be created before that instead, in a background thread, while the ranks load
their data and build their models; Lightning finds the group created and keeps it
(``torch.distributed.is_initialized()``). Lightning's own launcher starts the other ranks
only inside ``fit``, so there is nothing to overlap and this does nothing.

Recent Lightning (2.6 here) also checks before every training step under DDP whether rank 0
received a SIGTERM, so that every rank stops at the same step instead of the others waiting
forever in the next collective: it broadcasts a flag tensor from rank 0 through the default
process group and reads it with ``.item()``. On GPUs that makes the host wait for the GPU at
every step (the flag's copy to the GPU and back is queued behind the step's work), so no rank
can queue its next step while its GPU runs this one: on two H100s the host took 4.27 ms
between step starts under DDP against 0.65 ms on one GPU, and the GPU set no pace
(``benchmarks/profile_step.py --devices 2``; docs/training.md). :func:`check_sigterm_on_host`
keeps Lightning's rule (the same decision on every rank, every step) but sends the flag
between the hosts, through a gloo group, instead of through the GPUs.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
import time

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from neusdf.config import on_gpu

__all__ = ["EarlyConnect", "HostSigtermCheck", "check_sigterm_on_host", "start_early_connect"]

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


class HostSigtermCheck:
    """Lightning's per-step SIGTERM broadcast, sent between the hosts (a gloo group).

    Replaces two of the trainer's methods (private in Lightning, hence the check in
    :func:`check_sigterm_on_host` that both exist): the training loop's
    ``_broadcast_sigterm_tensor`` (every rank, before every training step: rank 0's flag,
    broadcast; all raise ``SIGTERMException`` when it is set) and the signal connector's
    ``_sigterm_notifier_fn`` (the SIGTERM handler). Rank 0 stops after the step in which it
    received the signal, without reaching the next check; like Lightning's, its handler
    therefore sends the set flag once more, which the other ranks' next check receives. The
    group is made at the first check, a point every rank reaches together; where gloo cannot
    make it, Lightning's own two methods (``lightning_check``, ``lightning_notify``) run
    instead.
    """

    def __init__(self, trainer: L.Trainer, lightning_check, lightning_notify) -> None:
        self.trainer = trainer
        self.lightning_check, self.lightning_notify = lightning_check, lightning_notify
        self.group: dist.ProcessGroup | None = None
        self.fallback = False  # True: no gloo group, Lightning's methods run
        self._sent: dist.Work | None = None  # the handler's broadcast, kept until it is done

    def check(self) -> None:
        """Before each training step on every rank: raises SIGTERMException on every rank
        when rank 0 received a SIGTERM, or when rank 0 cannot be heard (a rank that entered
        the step's gradient all-reduce without it would wait there forever)."""
        if self.group is None and not self.fallback:
            try:
                self.group = dist.new_group(backend="gloo")
            except Exception as e:
                log.warning("no gloo group for the SIGTERM check (%s): Lightning's instead", e)
                self.fallback = True
        if self.fallback:
            self.lightning_check()
            return
        flag = torch.tensor([1 if self.trainer.received_sigterm else 0])
        try:
            dist.broadcast(flag, src=0, group=self.group)
        except Exception as e:
            log.warning("rank %d: no SIGTERM flag from rank 0 (%s); stopping", self.rank, e)
            raise SIGTERMException() from e
        if flag.item() == 1:
            with contextlib.suppress(Exception):
                dist.barrier(group=self.group)  # every rank gets here before any exits
            raise SIGTERMException()

    def notify(self, signum, frame) -> None:
        """The SIGTERM handler: what Lightning's does, its broadcast on the gloo group."""
        if self.fallback:
            self.lightning_notify(signum, frame)
            return
        connector = self.trainer._signal_connector
        log.info("rank %d received SIGTERM (%s)", self.rank, signum)
        launcher = self.trainer.strategy.launcher
        if not connector.received_sigterm and launcher is not None:
            launcher.kill(signum)  # the ranks Lightning started itself
        if self.group is not None and self.rank == 0 and self._sent is None:
            # asynchronous: a handler that waited for the other ranks' next check could wait
            # forever, their GPUs being stuck in this step's all-reduce without this rank's
            self._sent = dist.broadcast(torch.tensor([1]), src=0, group=self.group, async_op=True)
        connector.received_sigterm = True

    @property
    def rank(self) -> int:
        return self.trainer.global_rank


def check_sigterm_on_host(trainer: L.Trainer) -> bool:
    """Installs :class:`HostSigtermCheck` on ``trainer``; returns whether it did.

    Leaves the trainer alone (False) when this Lightning has no per-step SIGTERM broadcast or
    its handler under other names; single-process runs never call either method.
    """
    loop = trainer.fit_loop.epoch_loop
    connector = getattr(trainer, "_signal_connector", None)
    if not (
        callable(getattr(loop, "_broadcast_sigterm_tensor", None))
        and callable(getattr(connector, "_sigterm_notifier_fn", None))
    ):
        return False
    host = HostSigtermCheck(trainer, loop._broadcast_sigterm_tensor, connector._sigterm_notifier_fn)
    # instance attributes shadow the methods: the loop calls the check before each step, and
    # the connector registers the handler by attribute when fit starts
    loop._broadcast_sigterm_tensor = host.check
    connector._sigterm_notifier_fn = host.notify
    return True
