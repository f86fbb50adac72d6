"""When the ranks connect before the fit (neusdf.distributed): only under torchrun and DDP.

The early connection itself runs in the torchrun test of tests/test_ddp.py (gloo, two ranks).
"""

from __future__ import annotations

import pytest
from conftest import compose_train

from neusdf.distributed import start_early_connect

TORCHRUN_ENV = {"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "RANK": "0"}


@pytest.fixture
def torchrun_env(monkeypatch):
    for k, v in TORCHRUN_ENV.items():
        monkeypatch.setenv(k, v)


@pytest.mark.parametrize(
    "overrides",
    [
        ["trainer.accelerator=cpu"],  # no DDP strategy
        ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=[0,1]"],  # a device list
    ],
)
def test_runs_that_lightning_must_connect_are_left_to_it(tmp_path, torchrun_env, overrides):
    assert start_early_connect(compose_train(overrides, tmp_path)) is None


@pytest.mark.parametrize("world_size", [None, "1"])
def test_without_torchrun_nothing_starts(tmp_path, monkeypatch, world_size):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    if world_size is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:  # torchrun with one rank: nobody to connect to
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
        monkeypatch.setenv("WORLD_SIZE", world_size)
    cfg = compose_train(["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"], tmp_path)
    assert start_early_connect(cfg) is None
