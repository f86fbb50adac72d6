"""The training step replayed as a CUDA graph does what the eager step does (CUDA only)."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch

from neusdf.data import SamplingConfig, SurfaceSamples
from neusdf.model import NeuralPointSDF, PointInit
from neusdf.module import SDFModule
from neusdf.step_graph import GraphedStep, graph_support

pytestmark = pytest.mark.skipif(graph_support() is not None, reason=str(graph_support()))


def toy_step(w: torch.Tensor, gen: torch.Generator):
    def step():
        x = torch.randn(64, 3, device=w.device, generator=gen)
        loss = ((x @ w) ** 2).mean()
        loss.backward()
        return {"loss": loss.detach(), "x": x}

    return step


def test_replays_draw_new_samples_and_write_the_gradients():
    w = torch.nn.Parameter(torch.randn(3, 1, device="cuda"))
    gen = torch.Generator(device="cuda").manual_seed(7)
    step = GraphedStep(toy_step(w, gen), [w], [gen], warmup=2)
    xs, grads = [], []
    for _ in range(6):
        out = step()
        xs.append(out["x"].clone())
        grads.append(w.grad.clone())
        with torch.no_grad():
            w -= 0.1 * w.grad  # the parameter moves between steps, as with an optimiser
    assert step.captured and step.calls == 6 and step.replays == 4  # calls 3 to 6
    # every step (eager, captured, replayed) drew fresh samples
    for a in range(6):
        for b in range(a):
            assert not torch.equal(xs[a], xs[b])
    # the gradients are those of each step's own samples and the parameter's current value
    w_now = w.detach().clone()
    for x, g in zip(reversed(xs), reversed(grads), strict=True):
        w_now += 0.1 * g  # undo the update made after this step
        expected = 2 * x.T @ (x @ w_now) / x.shape[0]
        torch.testing.assert_close(g, expected, rtol=1e-5, atol=1e-6)


def test_a_gradient_reset_to_none_between_replays_is_handed_back():
    # Lightning sets every .grad to None before validating; the replays after it must
    # still give the optimiser the step's gradients (they write into the captured buffers)
    w = torch.nn.Parameter(torch.randn(3, 1, device="cuda"))
    gen = torch.Generator(device="cuda").manual_seed(5)
    step = GraphedStep(toy_step(w, gen), [w], [gen], warmup=1)
    opt = torch.optim.SGD([w], lr=0.1)
    for i in range(6):
        if i in (2, 4):  # after the capture (call 2) and between replays
            opt.zero_grad(set_to_none=True)
        x = step()["x"].clone()
        assert w.grad is not None, i
        expected = 2 * x.T @ (x @ w.detach()) / x.shape[0]
        torch.testing.assert_close(w.grad, expected, rtol=1e-5, atol=1e-6)
        before = w.detach().clone()
        opt.step()
        assert not torch.equal(w.detach(), before), i


def test_replays_draw_the_eager_random_stream():
    w = torch.nn.Parameter(torch.randn(3, 1, device="cuda"))
    gen = torch.Generator(device="cuda").manual_seed(3)
    step = GraphedStep(toy_step(w, gen), [w], [gen], warmup=1)
    graphed = [step()["x"].clone() for _ in range(4)]
    gen.manual_seed(3)
    eager = [torch.randn(64, 3, device="cuda", generator=gen) for _ in range(4)]
    for a, b in zip(graphed, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


class LossTrace(L.Callback):
    """Records the loss of every step; at step ``reset_at`` sets every gradient to None, as
    Lightning does before it validates."""

    def __init__(self, reset_at: int | None = None) -> None:
        self.losses: list[float] = []
        self.reset_at = reset_at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if "train/loss" in trainer.callback_metrics:  # from the first logging step on
            self.losses.append(float(trainer.callback_metrics["train/loss"]))
        if trainer.global_step == self.reset_at:
            pl_module.zero_grad(set_to_none=True)


def train_losses(
    cuda_graph: bool,
    steps: int = 30,
    reset_at: int | None = None,
    log_every: int = 1,
    callbacks: tuple[L.Callback, ...] = (),
) -> tuple[list[float], SDFModule]:
    torch.manual_seed(0)
    d = np.random.default_rng(0).normal(size=(4000, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    net = NeuralPointSDF(num_points=1024, K=8, init=PointInit(0.4 * d, d), winding_resolution=16)
    module = SDFModule(
        net,
        model={},
        loss={"surface": 10.0, "normal": 1.0, "eikonal": 0.1, "near": 3.0, "sign": 10.0},
        optim={"lr": 2e-3, "lr_points": 2e-4, "lr_features": 1e-2, "lr_gaussians": 2e-3},
        sampling=SamplingConfig(1024, 256, 768, (0.01, 0.002), 0.55),
        validation={},
        cuda_graph=cuda_graph,
    )
    pts = torch.as_tensor(0.4 * d, dtype=torch.float32)
    module.set_surface(SurfaceSamples(pts, torch.as_tensor(d, dtype=torch.float32)))
    trace = LossTrace(reset_at)
    trainer = L.Trainer(
        accelerator="gpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        log_every_n_steps=log_every,
        callbacks=[trace, *callbacks],
    )
    loader = torch.utils.data.DataLoader(range(10**6), batch_size=None)
    trainer.fit(module, train_dataloaders=loader)
    return trace.losses, module


@pytest.mark.parametrize("reset_at", [None, 10])
def test_graphed_training_follows_the_eager_training(reset_at):
    # reset_at: gradients set to None mid-run (a validation) must not stall the replays
    eager, _ = train_losses(cuda_graph=False, reset_at=reset_at)
    graphed, module = train_losses(cuda_graph=True, reset_at=reset_at)
    assert module._graphed is not None and module._graphed.captured
    assert len(eager) == len(graphed) == 30
    # the same samples and the same math: the two runs differ only by the op's atomic
    # accumulation order (relative 1e-6 per step), far below what a stale gradient, a
    # repeated batch or a skipped update would change
    rel = np.abs(np.array(graphed) - np.array(eager)) / np.abs(np.array(eager))
    assert rel.max() < 1e-3, rel
    assert graphed[-1] < graphed[0]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_capture_follows_the_parameters_device_not_the_current_one():
    # a multirun worker that trained on GPU 1 before keeps it current while a job runs on GPU 0
    w = torch.nn.Parameter(torch.randn(3, 1, device="cuda:1"))
    gen = torch.Generator(device="cuda:1").manual_seed(5)
    with torch.cuda.device(0):
        step = GraphedStep(toy_step(w, gen), [w], [gen], warmup=1)
        xs = [step()["x"].clone() for _ in range(4)]
    assert step.captured and all(x.device == w.device for x in xs)
    assert not torch.equal(xs[2], xs[3])


class SyncGuard(L.Callback):
    """Makes any host synchronisation an error from the start of a replayed step that does not
    log to the start of the next step (so Lightning's work after the step is covered too)."""

    def __init__(self) -> None:
        self.guarded = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        torch.cuda.set_sync_debug_mode(0)
        after = trainer.global_step + 1  # the module's step count once this step has run
        logs = after % trainer.log_every_n_steps == 0 or after >= trainer.max_steps
        if pl_module._graphed.captured and not logs:
            torch.cuda.set_sync_debug_mode("error")
            self.guarded += 1

    def on_train_end(self, trainer, pl_module) -> None:
        torch.cuda.set_sync_debug_mode(0)


def test_replayed_steps_do_not_wait_for_the_gpu():
    # A step that synchronises keeps the host from queueing the next one while the GPU runs
    # this one (Lightning read the logged loss with .item() after every step).
    guard = SyncGuard()
    try:
        train_losses(cuda_graph=True, steps=14, log_every=5, callbacks=(guard,))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert guard.guarded >= 6
