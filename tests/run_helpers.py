"""Callbacks that tests add to a run through the config (``+callbacks.<name>._target_=...``)."""

from __future__ import annotations

import lightning as L


class InterruptAt(L.Callback):
    """Raises KeyboardInterrupt (as Ctrl-C would) once ``step`` steps are done."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step >= self.step:
            raise KeyboardInterrupt
