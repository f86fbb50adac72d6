"""Fits a neural SDF to one shape, extracts its mesh and scores it (Hydra entry point).

A thin entry over :mod:`neusdf.command` and :mod:`neusdf.pipeline` (see there, and
``docs/training.md``)::

    python train.py data.path=scan.ply trainer.max_steps=3000

``train`` is importable from here as well as from :mod:`neusdf.pipeline`.
"""

from neusdf.command import main

__all__ = ["main", "train"]  # noqa: F822 (train: the module __getattr__ below)


def __getattr__(name: str):
    # the pipeline (torch, Lightning) is imported on first use, not by the command line
    # itself: see neusdf.command
    if name == "train":
        from neusdf.pipeline import train

        return train
    raise AttributeError(f"module 'train' has no attribute {name!r}")


if __name__ == "__main__":
    main()
