"""Fits a neural SDF to one shape, extracts its mesh and scores it (Hydra entry point).

A thin entry over :mod:`neusdf.pipeline` (see there, and ``docs/training.md``)::

    python train.py data.path=scan.ply trainer.max_steps=3000

``train`` is importable from here as well as from :mod:`neusdf.pipeline`.
"""

import gc

_COMMAND = __name__ == "__main__"
if _COMMAND:
    # Importing torch, Lightning (which brings torchmetrics, scipy.signal and torch._dynamo),
    # Hydra and trimesh leaves ~400k objects that live as long as the process, and while they
    # pile up every full collection of the cyclic garbage collector walks them all again:
    # ~1.1 s of the ~3.9 s import on a 2-core CPU machine. Importing makes no garbage worth
    # that, so collection waits until the imports are done; gc.freeze then puts the imported
    # objects out of its reach: later collections walk only what the run itself creates, and
    # the interpreter's exit after the printed metrics takes ~0.2 s instead of ~1.2 s (its
    # collections walked them all again).
    gc.disable()

from neusdf.pipeline import main, train  # noqa: E402

__all__ = ["main", "train"]

if _COMMAND:
    gc.freeze()
    gc.enable()
    main()
