"""Two-process DDP on the CPU (gloo): ranks sample differently, end with equal parameters."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from conftest import ROOT, compose_train, tiny_overrides

from neusdf.checkpoint import load_checkpoint
from neusdf.pipeline import train


def test_two_ranks_end_identical_and_checkpoint_loads_on_one(tmp_path, sphere_mesh_path):
    run_dir, dump = tmp_path / "run", tmp_path / "dump"
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        *tiny_overrides(sphere_mesh_path, "reference"),
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.max_steps=5",
        f"hydra.run.dir={run_dir}",
        "+callbacks.dump._target_=ddp_helpers.DumpRankState",
        f"+callbacks.dump.out_dir={dump}",
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    r0, r1 = (torch.load(dump / f"rank{r}.pt") for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["step"] == r1["step"] == 5
    # each rank draws its own samples (seed + rank) ...
    assert not torch.equal(r0["samples"], r1["samples"])
    # ... and the all-reduced gradients keep the replicas bit-identical
    assert r0["params"].keys() == r1["params"].keys()
    for k in r0["params"]:
        assert torch.equal(r0["params"][k], r1["params"][k]), k
    # only rank 0 extracts and scores
    assert (run_dir / "mesh.ply").is_file() and (run_dir / "metrics.json").is_file()

    # the DDP checkpoint holds rank 0's (= every rank's) parameters and loads on one device
    last = run_dir / "checkpoints" / "last.ckpt"
    loaded = load_checkpoint(last, backend="reference")
    for k, v in loaded.net.named_parameters():
        assert torch.equal(v.detach(), r0["params"][k]), k
    resumed = train(
        compose_train(
            [
                *tiny_overrides(sphere_mesh_path, "reference"),
                f"ckpt_path={last}",
                "trainer.max_steps=7",
            ],
            tmp_path / "resumed",
        )
    )
    assert resumed["timing"]["steps"] == 7
