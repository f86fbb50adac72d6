"""Many shapes at once: a Hydra multirun through the joblib launcher, one job per shape."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import ROOT, tiny_overrides
from omegaconf import OmegaConf

from neusdf.config import register_resolvers
from neusdf.pipeline import multirun_device


def test_jobs_take_the_gpus_round_robin():
    assert [multirun_device(j, 2)[0] for j in range(5)] == [0, 1, 0, 1, 0]
    assert [multirun_device(j, 1)[0] for j in range(3)] == [0, 0, 0]
    with pytest.raises(ValueError, match="device_count"):
        multirun_device(0, 0)


def test_a_worker_process_keeps_the_gpu_of_its_first_job(monkeypatch):
    """A multirun worker trains every job on its first job's GPU: taking a GPU by job number
    would make each worker a CUDA context on every GPU (memory, set-up time)."""
    from types import SimpleNamespace

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    import neusdf.pipeline as pipeline

    monkeypatch.setattr(pipeline.torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(pipeline, "on_gpu", lambda accelerator: True)
    monkeypatch.setattr(pipeline, "_process_gpu", None)
    monkeypatch.setattr(HydraConfig, "initialized", staticmethod(lambda: True))
    devices = []
    for job in (1, 2, 5, 6):
        hydra = SimpleNamespace(mode=RunMode.MULTIRUN, job=SimpleNamespace(num=job))
        monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda hydra=hydra: hydra))
        cfg = OmegaConf.create({"trainer": {"accelerator": "gpu", "devices": 1}})
        pipeline._assign_multirun_device(cfg)
        devices.append(list(cfg.trainer.devices))
    assert devices == [[1], [1], [1], [1]]
    # a job that names its devices keeps them
    cfg = OmegaConf.create({"trainer": {"accelerator": "gpu", "devices": [0]}})
    pipeline._assign_multirun_device(cfg)
    assert list(cfg.trainer.devices) == [0]


def test_local_launcher_runs_two_jobs_per_gpu():
    register_resolvers()
    n_jobs = OmegaConf.create({"n": "${gpu_jobs:2}"}).n
    count = torch.cuda.device_count()
    assert n_jobs == (2 * count if count else 1)


def test_joblib_multirun_trains_every_shape_in_its_own_directory(tmp_path):
    paths = []
    for i, radius in enumerate((0.3, 0.4)):
        d = np.random.default_rng(i).normal(size=(3000, 3))
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        paths.append(tmp_path / f"shape{i}.npz")
        np.savez(paths[-1], points=radius * d, normals=d)
    sweep = tmp_path / "sweep"
    overrides = [o for o in tiny_overrides(paths[0]) if not o.startswith("data.path=")]
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "-m",
        "hydra/launcher=local",  # joblib; two jobs side by side here
        "hydra.launcher.n_jobs=2",
        f"data.path={paths[0]},{paths[1]}",
        *overrides,
        f"hydra.sweep.dir={sweep}",
    ]
    started = time.time()
    pipe = subprocess.PIPE
    proc = subprocess.Popen(cmd, stdout=pipe, stderr=pipe, text=True, cwd=ROOT)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    imports = []
    for job, path in enumerate(paths):
        metrics = json.loads((sweep / str(job) / "metrics.json").read_text())
        assert metrics["input"]["path"] == str(path)
        assert (sweep / str(job) / "mesh.ply").is_file()
        # the job ran in a worker process, which the command started once it had imported
        # Hydra and composed the sweep (seconds), and which reached the job's function
        # before the job began
        t = metrics["timing"]
        assert t["process_id"] != proc.pid
        assert started + 0.3 < t["process_started_at"] < t["job_function_at"] < t["started_at"]
        imports.append(t["pipeline_import_seconds"])
        # the worker's resident memory around the job (Linux /proc): torch alone is > 100 MiB
        memory = metrics["memory"]
        assert memory["host_resident_mib_at_start"] > 100
        assert memory["host_resident_mib_at_end"] > 100
    # a worker's first job imports the pipeline (torch, Lightning: seconds); a later job of
    # the same process finds it imported
    assert max(imports) > 0.5
    # each job scored its own shape: the two radii give different surfaces
    spacing = [json.loads((sweep / str(j) / "metrics.json").read_text())["input"]["spacing"]
               for j in range(2)]  # fmt: skip
    assert spacing[0] != spacing[1]
