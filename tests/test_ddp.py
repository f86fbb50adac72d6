"""Two-process DDP: ranks sample differently and end with equal parameters.

On the CPU (gloo, every CI run) with eager steps; on two GPUs (NCCL, the GPU machine) with
the step replayed as a CUDA graph on each rank, the gradients averaged after each replay.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence

import pytest
import torch
from conftest import ROOT, compose_train, tiny_overrides

from neusdf.checkpoint import load_checkpoint
from neusdf.pipeline import train
from neusdf.step_graph import graph_support

# torch's launcher starting both ranks at once
TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def run_two_ranks(
    shape,
    run_dir,
    dump,
    accelerator: str,
    backend: str,
    steps: int,
    torchrun: bool = False,
    extra: Sequence[str] = (),
    check: bool = True,
) -> subprocess.CompletedProcess:
    """train.py with trainer=ddp on two devices; each rank dumps its state (ddp_helpers).

    ``torchrun``: both ranks started at once by ``python -m torch.distributed.run`` (else
    Lightning starts the second rank itself). ``extra``: further overrides. ``check``: assert
    that the command succeeded."""
    cmd = [
        sys.executable,
        *(TORCHRUN if torchrun else []),
        str(ROOT / "train.py"),
        *tiny_overrides(shape, backend),
        "trainer=ddp",
        f"trainer.accelerator={accelerator}",
        "trainer.devices=2",
        f"trainer.max_steps={steps}",
        f"hydra.run.dir={run_dir}",
        "+callbacks.dump._target_=ddp_helpers.DumpRankState",
        f"+callbacks.dump.out_dir={dump}",
        *extra,
    ]
    # prepended: packages found through an existing PYTHONPATH stay importable in the ranks
    path = [str(ROOT / "tests"), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def load_ranks(dump, steps: int) -> tuple[dict, dict]:
    """Both ranks' dumps, after checking that they sampled differently and end identical."""
    r0, r1 = (torch.load(dump / f"rank{r}.pt") for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["step"] == r1["step"] == steps
    # each rank draws its own samples (seed + rank) ...
    assert not torch.equal(r0["samples"], r1["samples"])
    # ... and the averaged gradients keep the replicas bit-identical
    assert r0["params"].keys() == r1["params"].keys()
    for k in r0["params"]:
        assert torch.equal(r0["params"][k], r1["params"][k]), k
    return r0, r1


@pytest.mark.skipif(
    torch.cuda.device_count() < 2 or graph_support() is not None, reason="needs 2 CUDA devices"
)
def test_two_gpu_ranks_replay_the_graph_and_end_identical(tmp_path, sphere_mesh_path):
    run_dir, dump, steps = tmp_path / "run", tmp_path / "dump", 10
    run_two_ranks(sphere_mesh_path, run_dir, dump, "gpu", "compiled", steps)
    r0, r1 = load_ranks(dump, steps)
    assert r0["graph_replays"] == r1["graph_replays"] > 0
    assert (run_dir / "mesh.ply").is_file()


def test_two_ranks_end_identical_and_checkpoint_loads_on_one(tmp_path, sphere_mesh_path):
    run_dir, dump = tmp_path / "run", tmp_path / "dump"
    run_two_ranks(sphere_mesh_path, run_dir, dump, "cpu", "reference", 5)
    r0, r1 = load_ranks(dump, 5)
    assert r0["graph_replays"] == 0  # the CPU steps eagerly
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


def test_torchrun_starts_both_ranks_that_end_identical(tmp_path, sphere_mesh_path):
    # torchrun starts the ranks itself (Lightning launches nothing); they share the run
    # directory named on the command line, and only rank 0 writes the run's files
    run_dir, dump = tmp_path / "run", tmp_path / "dump"
    run_two_ranks(sphere_mesh_path, run_dir, dump, "cpu", "reference", 4, torchrun=True)
    load_ranks(dump, 4)  # sampled differently, end identical
    assert (run_dir / "mesh.ply").is_file() and (run_dir / "metrics.json").is_file()
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dump", "run"]  # no stray run dirs
    # the ranks connected while the data loaded, before the fit (neusdf.distributed)
    timing = json.loads((run_dir / "metrics.json").read_text())["timing"]
    assert timing["connect_wait_seconds"] >= 0


def test_a_sigterm_on_rank_0_stops_both_ranks_at_the_same_step(tmp_path, sphere_mesh_path):
    # Lightning's rule (every rank stops at the same step, none waits in a collective for a
    # rank that left), kept by the host-side check (neusdf.distributed.HostSigtermCheck)
    run_dir, dump, stops = tmp_path / "run", tmp_path / "dump", tmp_path / "stops"
    callback = [
        "+callbacks.sigterm._target_=ddp_helpers.SigtermAt",
        f"+callbacks.sigterm.out_dir={stops}",
        "+callbacks.sigterm.step=3",
    ]
    proc = run_two_ranks(
        sphere_mesh_path,
        run_dir,
        dump,
        "cpu",
        "reference",
        50,
        torchrun=True,
        extra=callback,
        check=False,
    )
    log = proc.stdout[-2000:] + proc.stderr[-2000:]
    records = [json.loads((stops / f"stop{r}.json").read_text()) for r in (0, 1)]
    assert all(r["host_check"] and r["exception"] == "SIGTERMException" for r in records), log
    # rank 0 stops after the step of its signal, rank 1 before the next one
    assert records[0]["step"] == records[1]["step"] == 3, log


def test_torchrun_without_a_run_directory_is_refused(tmp_path, sphere_mesh_path):
    cmd = [
        sys.executable,
        *TORCHRUN,
        str(ROOT / "train.py"),
        *tiny_overrides(sphere_mesh_path, "reference"),
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    assert "pass hydra.run.dir=<dir>" in proc.stderr
