"""Lightning callbacks of a training run: what a careful user expects around the training loop.

- :class:`RunRecorder` records the training data in every checkpoint, remembers the step a
  run started from (so speeds count this run's steps only), makes the last step validate (so
  every run ends with ``val/*`` metrics, an image, a mesh and ``best.ckpt``) and, on Ctrl-C,
  saves ``last.ckpt`` and says how to resume or extract from it.
- :class:`StepProgressBar` counts global steps against ``max_steps`` (the step loader is
  endless, so Lightning's bar would show ``210/?``).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar

from neusdf.checkpoint import DATA_KEY

__all__ = ["RunRecorder", "StepProgressBar", "last_checkpoint_path"]


def last_checkpoint_path(trainer: L.Trainer) -> Path | None:
    """Where ``last.ckpt`` goes (None without a checkpoint callback that saves it)."""
    cb = trainer.checkpoint_callback
    if cb is None or not getattr(cb, "save_last", False) or cb.dirpath is None:
        return None
    return Path(cb.dirpath) / f"{cb.CHECKPOINT_NAME_LAST}.ckpt"


class RunRecorder(L.Callback):
    """Records the data, the start step, validates at the end and saves on Ctrl-C.

    Args:
        data: what the checkpoints record about the training data (see
            :func:`neusdf.checkpoint.data_record`).
        resume_args: command-line arguments that select this run's data (printed in the
            resume hint after an interruption), e.g. ``["data.path=scan.ply"]``.
    """

    def __init__(self, data: dict, resume_args: list[str] | None = None) -> None:
        self.data = data
        self.resume_args = list(resume_args or [])
        self.start_step = 0
        self.interrupted_at: int | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start_step = trainer.global_step  # the restored step when resuming

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        # Stopping "early" at the last step makes Lightning validate it (and save best.ckpt),
        # whether or not max_steps is a multiple of val_check_interval.
        if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            trainer.should_stop = True

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[DATA_KEY] = dict(self.data)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if not isinstance(exception, KeyboardInterrupt):
            return
        last = last_checkpoint_path(trainer)
        step = trainer.global_step
        self.interrupted_at = step
        if last is None:
            print(f"\ninterrupted at step {step}; no checkpoint callback, nothing saved")
            return
        trainer.save_checkpoint(last, weights_only=False)
        if trainer.global_rank != 0:
            return
        resume = shlex.join(["python", "train.py", *self.resume_args, f"ckpt_path={last}"])
        extract = shlex.join(["python", "-m", "neusdf.extract", f"ckpt={last}"])
        print(
            f"\ninterrupted at step {step}: saved {last}\n"
            f"  resume:  {resume}\n"
            f"  extract: {extract}",
            file=sys.stderr,
            flush=True,
        )


class StepProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar, counting global steps out of ``max_steps`` (also after a resume)."""

    def on_train_epoch_start(self, trainer: L.Trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps if trainer.max_steps > 0 else None)
        bar.initial = trainer.global_step
        bar.n = trainer.global_step
        bar.set_description("Training")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx):
        n, total = trainer.global_step, self.train_progress_bar.total
        if self._should_update(n, total) and not self.train_progress_bar.disable:
            self.train_progress_bar.n = n
            self.train_progress_bar.refresh()
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))
