"""CI: an installed wheel works on its own, away from the source checkout.

Run with the Python of a fresh environment that has the wheel installed, from a directory
outside the checkout: the op is built from the sources the wheel carries and checked against
the plain-PyTorch reference (values and gradients), then the ``neusdf-train`` and
``neusdf-extract`` commands make a tiny run on the packaged default shape.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import neusdf
from neusdf.config import CONFIG_DIR, DATA_DIR
from neusdf.ops import knn_aggregate_aniso, knn_aggregate_aniso_reference
from neusdf.ops.build import SOURCE_DIR


def check_layout() -> None:
    """neusdf, its op sources, configs and default shape all come from the installed wheel."""
    package = Path(neusdf.__file__).resolve().parent
    if "site-packages" not in package.parts:
        sys.exit(f"neusdf was imported from {package}, not from an installed wheel")
    for name, path in (("op sources", SOURCE_DIR), ("configs", CONFIG_DIR), ("data", DATA_DIR)):
        if package not in path.parents:
            sys.exit(f"{name} at {path}, outside the installed package {package}")
    print(f"installed package: {package}")


def check_op() -> None:
    """The compiled op against the reference: outputs and gradients (float64)."""
    g = torch.Generator().manual_seed(0)
    B, Q, P, F, K = 2, 300, 64, 5, 6
    f64 = torch.float64
    q = torch.rand(B, Q, 3, generator=g, dtype=f64) * 2 - 1
    p = torch.rand(B, P, 3, generator=g, dtype=f64) * 2 - 1
    f = torch.randn(B, P, F, generator=g, dtype=f64)
    radii = 0.3 * 4.0 ** (torch.rand(B, P, 3, generator=g, dtype=f64) - 0.5)
    sigma = 1.0 / radii**2
    R = torch.linalg.qr(torch.randn(B, P, 3, 3, generator=g, dtype=f64))[0]
    results = []
    for op in (knn_aggregate_aniso, knn_aggregate_aniso_reference):
        inputs = [t.clone().requires_grad_() for t in (q, p, f, sigma, R)]
        f_out, w, dists, idx = op(*inputs, K)
        (f_out.square().sum() + w.sum() + dists.sum()).backward()
        results.append([f_out, w, dists, idx, *(t.grad for t in inputs)])
    names = ["f_out", "w", "dists", "idx", "dq", "dp", "df", "dsigma", "dR"]
    for name, a, b in zip(names, *results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9, msg=lambda m, n=name: f"{n}: {m}")
    print("compiled op matches the reference (values and gradients)")


def check_commands() -> None:
    """A tiny training run and an extraction through the console commands."""
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        train = [
            "neusdf-train",
            "debug=default",
            "logger=csv",
            "callbacks.progress_bar.refresh_rate=0",
            f"hydra.run.dir={run}",
        ]
        subprocess.run(train, check=True, cwd=tmp)
        metrics = json.loads((run / "metrics.json").read_text())
        if not metrics["chamfer_l1"] < 0.05 or metrics["timing"]["steps"] != 6:
            sys.exit(f"unexpected training result: {metrics}")
        mesh = Path(tmp) / "mesh.ply"
        extract = [
            "neusdf-extract",
            f"ckpt={run / 'checkpoints' / 'last.ckpt'}",
            "resolution=32",
            f"output={mesh}",
            f"reference={DATA_DIR / 'default_shape.ply'}",
            "num_query=2000",
            "num_ref=5000",
        ]
        subprocess.run(extract, check=True, cwd=tmp)
        if not mesh.is_file() or not mesh.with_suffix(".metrics.json").is_file():
            sys.exit("neusdf-extract wrote no mesh or metrics")
    print("neusdf-train and neusdf-extract ran from the installed wheel")


if __name__ == "__main__":
    if Path.cwd().resolve() == Path(__file__).resolve().parents[1]:
        sys.exit("run this from outside the checkout")
    print(f"TORCH_EXTENSIONS_DIR={os.environ.get('TORCH_EXTENSIONS_DIR', '(default)')}")
    check_layout()
    check_op()
    check_commands()
