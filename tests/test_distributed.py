"""neusdf.distributed: when the ranks connect before the fit (only under torchrun and DDP),
and the per-step SIGTERM check on the host.

The early connection itself runs in the torchrun test of tests/test_ddp.py (gloo, two ranks),
as does a SIGTERM on rank 0 of a two-rank run.
"""

from __future__ import annotations

import signal

import lightning as L
import pytest
import torch.distributed as dist
from conftest import compose_train
from lightning.pytorch.utilities.exceptions import SIGTERMException

from neusdf.distributed import HostSigtermCheck, check_sigterm_on_host, start_early_connect

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


# ----------------------------------------------------------- the SIGTERM check on the host
@pytest.fixture
def one_rank_group(tmp_path):
    """A gloo process group of this process alone (rank 0 of 1)."""
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1
    )
    yield
    dist.destroy_process_group()


def cpu_trainer() -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False
    )


def test_the_check_replaces_lightnings_where_this_lightning_has_one():
    trainer = cpu_trainer()
    loop, connector = trainer.fit_loop.epoch_loop, trainer._signal_connector
    has = hasattr(type(loop), "_broadcast_sigterm_tensor")
    assert check_sigterm_on_host(trainer) == has
    if has:
        assert isinstance(loop._broadcast_sigterm_tensor.__self__, HostSigtermCheck)
        assert connector._sigterm_notifier_fn.__self__ is loop._broadcast_sigterm_tensor.__self__


def test_the_check_raises_once_rank_0_received_sigterm(one_rank_group):
    trainer = cpu_trainer()
    host = HostSigtermCheck(trainer, None, None)
    host.check()  # no signal: nothing happens
    assert host.group is not None
    host.notify(signal.SIGTERM, None)
    assert trainer.received_sigterm
    host._sent.wait()  # the handler's broadcast, which another rank's check would receive
    with pytest.raises(SIGTERMException):
        host.check()


def test_without_gloo_lightnings_check_runs(one_rank_group, monkeypatch):
    calls = []

    def no_gloo(*args, **kwargs):
        raise RuntimeError("no gloo here")

    monkeypatch.setattr(dist, "new_group", no_gloo)
    host = HostSigtermCheck(
        cpu_trainer(), lambda: calls.append("check"), lambda s, f: calls.append("notify")
    )
    host.check()
    host.check()
    host.notify(signal.SIGTERM, None)
    assert host.fallback and calls == ["check", "check", "notify"]
