"""Fits a neural SDF to one shape, extracts its mesh and scores it (Hydra entry point).

A thin entry over :mod:`neusdf.command` and :mod:`neusdf.pipeline` (see there, and
``docs/training.md``)::

    python train.py data.path=scan.ply trainer.max_steps=3000

``train`` is importable from here as well as from :mod:`neusdf.pipeline`.
"""

import gc

_COMMAND = __name__ == "__main__"
if _COMMAND:
    # The command's own imports (Hydra, the config, torch) with the cyclic garbage collector
    # held off, as neusdf.command does for the pipeline's: see _import_pipeline there.
    gc.disable()

from neusdf.command import main  # noqa: E402

__all__ = ["main", "train"]  # noqa: F822 (train: the module __getattr__ below)


def __getattr__(name: str):
    # the pipeline (torch's training stack, Lightning) is imported on first use, not by the
    # command line itself: see neusdf.command
    if name == "train":
        from neusdf.pipeline import train

        return train
    raise AttributeError(f"module 'train' has no attribute {name!r}")


if _COMMAND:
    gc.freeze()
    gc.enable()
    main()
