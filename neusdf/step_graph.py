"""A training step replayed as one CUDA graph.

Every size in a step is fixed (the sample counts, the neural points, K), so the work of a step
(draw the samples, the SDF and its gradient, the losses, the backward with the op's double
backward) is the same sequence of some 500 kernels each time. Launched one by one from Python
that sequence is bound by the host (measured on an H100: 14.6 ms of host time for 4.4 ms of GPU
work). Captured once in a CUDA graph, a step is one launch and the GPU stays busy.

What is captured: whatever ``step`` does, which must be free of host synchronisation (the op
skips its value checks while a graph is being captured) and write its gradients into the
parameters' ``.grad``. What is not: the optimiser step and the learning-rate schedule, which
run eagerly after each replay (a fused Adam is a few kernels), so that Lightning counts the
step, schedules the learning rate and saves the optimiser as usual.

How: the first ``warmup`` calls run eagerly on a side stream (they are real training steps:
they create the optimiser's state, the autograd engine's streams and the library handles that
must exist before a capture); the next call captures ``step`` into a graph (the gradients are
reset to None first, so that the captured backward allocates them in the graph's memory and
every replay writes them there), and every call from then on replays it. Random numbers come
from generators registered with the graph, so each replay draws new samples.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence

import torch

__all__ = ["GraphedStep", "graph_support"]

log = logging.getLogger(__name__)

# Eager steps before the capture (the PyTorch recipe for whole-step capture uses a few).
DEFAULT_WARMUP = 3

StepFn = Callable[[], dict[str, torch.Tensor]]


def graph_support() -> str | None:
    """Why this PyTorch cannot capture a step with a custom generator (None: it can)."""
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
        return f"torch {torch.__version__} cannot register a generator with a CUDA graph"
    return None


class GraphedStep:
    """Runs ``step`` eagerly ``warmup`` times, then captures it and replays the capture.

    Args:
        step: computes the step's loss terms and calls ``backward`` on the total; returns
            dict name -> scalar tensor. Must not synchronise with the host.
        params: the parameters whose gradients ``step`` produces (reset to None before the
            capture; afterwards their ``.grad`` are the graph's buffers, which every replay
            overwrites: no need to zero them). A parameter the step gives no gradient keeps
            None, as it would in eager steps.
        generators: CUDA generators that ``step`` draws from.
        warmup: eager calls before the capture (>= 1).

    Calling it runs one step and returns the terms. After the capture, the returned tensors
    are the graph's outputs: the next call overwrites them, so read (or copy) them first.
    """

    def __init__(
        self,
        step: StepFn,
        params: Iterable[torch.nn.Parameter],
        generators: Sequence[torch.Generator] = (),
        warmup: int = DEFAULT_WARMUP,
    ) -> None:
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1, got {warmup}")
        self.step = step
        self.params = [p for p in params if p.requires_grad]
        if not self.params or self.params[0].device.type != "cuda":
            raise ValueError("GraphedStep needs parameters on a CUDA device")
        # The stream, the capture and every replay on the parameters' device, whatever the
        # current device is (a process that trained on another GPU before, as a multirun
        # worker does, may still have that one current).
        self.device = self.params[0].device
        self.generators = list(generators)
        self.warmup = warmup
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: dict[str, torch.Tensor] = {}
        # the gradient buffers the capture wrote (None where the step gives no gradient)
        self._grads: list[torch.Tensor | None] = []
        with torch.cuda.device(self.device):
            self._side = torch.cuda.Stream()
            # its own capture stream: torch.cuda.graph's default one is created once per
            # process, on whichever device was current then
            self._capture_stream = torch.cuda.Stream()

    @property
    def captured(self) -> bool:
        """Whether the step has been captured (later calls replay it)."""
        return self.graph is not None

    @property
    def replays(self) -> int:
        """Calls that replayed the graph (the capturing call replays too; 0 before it)."""
        return self.calls - self.warmup if self.captured else 0

    def __call__(self) -> dict[str, torch.Tensor]:
        self.calls += 1
        with torch.cuda.device(self.device):
            if self.graph is None:
                if self.calls <= self.warmup:
                    return self._eager()
                self._capture()  # records the work without running it: replayed below
            # Someone may have reset a .grad since (Lightning sets every gradient to None
            # before validating, to free memory): the replay writes into the captured
            # buffers, so hand those back, or the optimiser would see no gradient at all.
            for p, g in zip(self.params, self._grads, strict=True):
                if p.grad is not g:
                    p.grad = g
            self.graph.replay()
        return self.outputs

    def _eager(self) -> dict[str, torch.Tensor]:
        for p in self.params:
            p.grad = None
        main = torch.cuda.current_stream()
        self._side.wait_stream(main)
        with torch.cuda.stream(self._side):
            out = self.step()
        main.wait_stream(self._side)
        return out

    def _capture(self) -> None:
        for p in self.params:
            p.grad = None
        graph = torch.cuda.CUDAGraph()
        for gen in self.generators:
            graph.register_generator_state(gen)
        with torch.cuda.graph(graph, stream=self._capture_stream):
            self.outputs = self.step()
        self._grads = [p.grad for p in self.params]
        self.graph = graph
        log.info("training step captured in a CUDA graph after %d eager steps", self.warmup)
