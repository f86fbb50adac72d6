"""A callback the DDP test injects into train.py runs (importable via PYTHONPATH=tests)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import lightning as L
import torch

from neusdf.data import draw_samples
from neusdf.distributed import HostSigtermCheck


class DumpRankState(L.Callback):
    """Saves, per rank, the first samples the rank will draw, its final parameters and how
    many steps were graph replays."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.first_samples: torch.Tensor | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        # replay this rank's generator on a copy: the samples of its first step
        gen = torch.Generator(device=pl_module.device)
        gen.set_state(pl_module._generator.get_state())
        b = draw_samples(pl_module.bank_points, pl_module.bank_normals, pl_module.sampling, gen)
        self.first_samples = b["space"].cpu()

    def on_train_end(self, trainer, pl_module) -> None:
        g = pl_module._graphed
        params = {k: v.detach().cpu() for k, v in pl_module.net.named_parameters()}
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "params": params,
                "samples": self.first_samples,
                "step": trainer.global_step,
                "world_size": trainer.world_size,
                # steps replayed from a CUDA graph (0: every step ran eagerly)
                "graph_replays": g.replays if g is not None else 0,
            },
            self.out_dir / f"rank{trainer.global_rank}.pt",
        )


class SigtermAt(L.Callback):
    """Rank ``rank`` sends itself a SIGTERM after step ``step``; every rank records the step
    at which it stopped and whether the host-side SIGTERM check was in place."""

    def __init__(self, out_dir: str, step: int, rank: int = 0) -> None:
        self.out_dir, self.step, self.rank = Path(out_dir), step, rank

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        check = trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor
        self.out_dir.mkdir(parents=True, exist_ok=True)
        record = {
            "step": trainer.global_step,
            "exception": type(exception).__name__,
            "host_check": isinstance(getattr(check, "__self__", None), HostSigtermCheck),
        }
        (self.out_dir / f"stop{trainer.global_rank}.json").write_text(json.dumps(record))
