"""The training step captured once as a CUDA graph and replayed for every full batch.

On a GPU a step of this small MLP is a couple of dozen tiny kernels: eager PyTorch
spends longer launching them from Python than the card spends running them. A CUDA graph
records the step's kernels once; a replay launches them all with one call. The step itself is
unchanged (the tutorial's forward, loss, ``zero_grad``, backward and Adam step, see
:func:`workers.training.train.train_step`), and so are the batches: a replay reads its batch's
indices
from a tensor the loop copies them into, and gathers the images on the device.

Capturing needs the step's memory to exist first (Adam's moments, cuBLAS workspaces), so the
step is run a few times beforehand. Those runs must not train the model: the parameters and the
optimizer's state are copied before them and written back after, in place, at the addresses
the graph will use. A batch of another size (the last of an epoch when the training set does
not divide by the batch size) runs eagerly on the same parameters and optimizer.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import torch

log = logging.getLogger("workers")

# A step of the training loop: a batch's indices into the training set → its loss, still on the
# device (the loop never waits for it).
Step = Callable[[torch.Tensor], torch.Tensor]

# Runs before the capture; PyTorch's documentation asks for a few (it uses 3 and 11).
WARMUP_STEPS = 3


class GraphBackend(Protocol):
    """How a step is warmed up, captured and replayed (CUDA's, or a stand-in in tests)."""

    def warm_up(self, run: Callable[[], torch.Tensor], times: int) -> None:
        """Run ``run`` ``times`` times as the capture needs it to have run."""

    def capture(self, run: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, Callable[[], None]]:
        """Record ``run``: its output tensor, and what replays it (rewriting that tensor)."""


class CudaGraphs:
    """:class:`GraphBackend` on the current CUDA device (``torch.cuda.graph``)."""

    def warm_up(self, run: Callable[[], torch.Tensor], times: int) -> None:
        """Run on a side stream, as a capture requires of the work before it."""
        side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        side.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(side):
                for _ in range(times):
                    run()
        finally:
            # Also when a run fails: what follows (the restore of the model) must come after
            # every kernel the side stream was given.
            torch.cuda.current_stream().wait_stream(side)

    def capture(self, run: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, Callable[[], None]]:
        """One graph; the tensors it allocates stay in its private memory pool."""
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.current_stream()
        try:
            with torch.cuda.graph(graph):
                output = run()
        finally:
            # A capture that fails can leave its own stream current (torch.cuda.graph ends the
            # capture before it restores the stream): the eager fallback runs on this one.
            torch.cuda.set_stream(stream)
        return output, graph.replay


def graph_backend(device: torch.device, enabled: bool) -> GraphBackend | None:
    """CUDA graphs on a CUDA device when enabled (MNIST_CUDA_GRAPHS); else None (eager)."""
    return CudaGraphs() if enabled and device.type == "cuda" else None


@contextlib.contextmanager
def training_state_kept(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Undo, in place, whatever the block does to the parameters and the optimizer's state.

    In place, because a captured graph keeps the addresses it saw. State the block creates
    (Adam's step count and moments, made at its first step) is set to zero, the value Adam
    starts each of them from, so the next real step is the run's first.
    """
    params = [p.detach().clone() for p in model.parameters()]
    state = {
        p: {k: v.clone() for k, v in optimizer.state[p].items() if isinstance(v, torch.Tensor)}
        for p in model.parameters()
        if p in optimizer.state
    }
    try:
        yield
    finally:
        with torch.no_grad():
            for p, saved in zip(model.parameters(), params, strict=True):
                p.copy_(saved)
            for p in model.parameters():
                before = state.get(p, {})
                for key, value in optimizer.state.get(p, {}).items():
                    if not isinstance(value, torch.Tensor):
                        continue
                    if key in before:
                        value.copy_(before[key])
                    else:
                        value.zero_()


@contextlib.contextmanager
def tensors_kept(tensors: Sequence[torch.Tensor]) -> Iterator[None]:
    """Undo, in place, whatever the block does to ``tensors`` (a pack's whole training state,
    :class:`workers.training.packing.Pack`, which exists before its first step)."""
    saved = [t.detach().clone() for t in tensors]
    try:
        yield
    finally:
        with torch.no_grad():
            for t, value in zip(tensors, saved, strict=True):
                t.copy_(value)


class GraphedStep:
    """``step`` for full batches by replaying one capture of it; other sizes run it eagerly.

    ``batch_size`` is a full batch's shape: one job's ``B`` indices, or a pack's ``(K, B)``.
    What the runs before the capture change is undone: ``model`` and ``optimizer``'s state, or
    the tensors of ``state``.
    """

    def __init__(
        self,
        step: Step,
        *,
        batch_size: int | tuple[int, ...],
        device: torch.device,
        model: torch.nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        state: Sequence[torch.Tensor] = (),
        backend: GraphBackend,
    ) -> None:
        self._step = step
        # Index 0 repeated: a valid batch for the runs before the capture.
        self._batch = torch.zeros(batch_size, dtype=torch.int64, device=device)
        kept = (
            tensors_kept(state)
            if model is None or optimizer is None
            else training_state_kept(model, optimizer)
        )
        with kept:
            backend.warm_up(self._run, WARMUP_STEPS)
            self._loss, self._replay = backend.capture(self._run)

    def _run(self) -> torch.Tensor:
        return self._step(self._batch)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """The step on ``batch``; its loss in a tensor of its own, still on the device."""
        if batch.shape != self._batch.shape:
            return self._step(batch)
        self._batch.copy_(batch)
        self._replay()
        return self._loss.clone()  # the next replay rewrites the graph's own loss tensor


def graphed(
    step: Step,
    *,
    batch_size: int | tuple[int, ...],
    device: torch.device,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    state: Sequence[torch.Tensor] = (),
    backend: GraphBackend | None,
) -> Step:
    """``step`` replayed from a graph where ``backend`` is given and capturing works; else itself.

    A step that cannot be captured (an unusual driver, a PyTorch without the support) trains
    eagerly, with a warning: slower, never wrong, as the capture leaves the model untouched.
    """
    if backend is None:
        return step
    try:
        return GraphedStep(
            step,
            batch_size=batch_size,
            device=device,
            model=model,
            optimizer=optimizer,
            state=state,
            backend=backend,
        )
    except Exception:
        log.warning(
            "could not capture the training step as a graph; training eagerly", exc_info=True
        )
        if optimizer is not None:
            optimizer.zero_grad()
        return step
