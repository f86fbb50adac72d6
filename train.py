"""Fits a neural SDF to one shape, extracts its mesh and scores it (Hydra entry point).

A thin entry over :mod:`neusdf.pipeline` (see there, and ``docs/training.md``)::

    python train.py data.path=scan.ply trainer.max_steps=3000

``train`` is importable from here as well as from :mod:`neusdf.pipeline`.
"""

from neusdf.pipeline import main, train

__all__ = ["main", "train"]

if __name__ == "__main__":
    main()
