"""Packed training: K compatible jobs trained as one stacked SimpleMLP, one batched step for all.

The tutorial's model uses a sliver of a core's width per step, so K jobs that share a step's
shape (:func:`pack_key`) are stacked along a leading dimension and trained together: K small
matrix products become one batched product (``torch.baddbmm``/``bmm``), K optimiser updates one
pass over a [K, P] buffer (issue #17). Each job keeps what makes it itself: its initialisation
(``SimpleMLP()`` right after ``torch.manual_seed(seed)``, as
:func:`workers.training.train.train`), its
shuffle generator and so its batches, its learning rate, its Adam moments and its report.

The loss is the sum over jobs of each job's mean cross entropy, so each job's gradient is its
solo gradient. The two layers' backward is written out rather than left to autograd: it writes
the gradients straight into one flat buffer, which the vectorised Adam update (the arithmetic
of torch's fused CPU kernel, with a per-job step size) then reads in one pass, and it spares
the autograd graph's per-op cost, which dominates a step this small. What differs from a solo
run is float rounding only (batched versus single products, the order of a few sums);
tests/workers/training/test_packing.py measures how much.

A job whose report raises (cancelled, lease lost, diverged, over its time) leaves the pack;
the others go on with the same numbers. A job's training state is an ordinary SimpleMLP
state_dict and Adam state (:class:`PackedJobState`), so a solo run resumes from it and a pack
resumes from a solo run's.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch.profiler import record_function

from service.ml import SimpleMLP
from service.schemas import JobCreate
from workers.data import Mnist
from workers.resume import SavedState, TrainingState
from workers.training.graphs import GraphBackend, Step, graphed
from workers.training.train import TrainingReport, make_optimizer

PACK_FIELDS = ("epochs", "batch_size", "trainset_size", "testset_size")


class Unpackable(RuntimeError):
    """These jobs cannot train as one pack (they differ where a pack's step must not, or a
    device lacks what it needs): not the jobs' fault, so they train alone instead
    (:mod:`workers.packed`), where a ValueError would fail them."""


def pack_key(params: JobCreate) -> tuple[int, ...]:
    """What jobs must share to train in one pack (and the device, which a worker has one of)."""
    return tuple(getattr(params, name) for name in PACK_FIELDS)


@dataclass(frozen=True)
class PackedJob:
    """One job of a pack: its parameters, seed, report, and the state it resumes from."""

    params: JobCreate
    seed: int
    report: TrainingReport
    resume_from: SavedState | None = None


@dataclass(frozen=True)
class PackedJobState(TrainingState):
    """A packed job's :class:`TrainingState`, with that job's own global RNG state.

    A solo run saves torch's global RNG as it stands after its model's initialisation (the loop
    draws nothing else from it); in a pack the global RNG is the last-initialised job's, so each
    job keeps its own copy. Valid for the epoch it was reported with: the next step moves on.
    """

    torch_rng: torch.Tensor

    def snapshot(self, epoch: int) -> dict[str, Any]:
        """As :meth:`TrainingState.snapshot`, with this job's global RNG state."""
        state = super().snapshot(epoch)
        state["torch_rng"] = self.torch_rng.clone()
        return state


@dataclass(frozen=True)
class _Solo:
    """What :func:`workers.training.train.train` sets up for one job, before any step."""

    state: TrainingState
    torch_rng: torch.Tensor
    done_epochs: int


def _solo_setup(job: PackedJob, device: torch.device) -> _Solo:
    """Model, Adam and shuffle generator exactly as a solo run makes them, then resumed."""
    torch.manual_seed(job.seed)
    shuffle = torch.Generator(device=device).manual_seed(job.seed)
    model = SimpleMLP().to(device)
    optimizer = make_optimizer(model, job.params.learning_rate, device)
    state = TrainingState(model, optimizer, shuffle)
    done = state.restore(job.resume_from) if job.resume_from is not None else 0
    return _Solo(state, torch.get_rng_state(), done)


def _check_compatible(jobs: Sequence[PackedJob]) -> None:
    if not jobs:
        raise Unpackable("a pack needs at least one job")
    first = jobs[0].params
    for job in jobs[1:]:
        for name in PACK_FIELDS:
            if getattr(job.params, name) != getattr(first, name):
                raise Unpackable(
                    f"jobs in one pack must share {name}: {getattr(first, name)} "
                    f"and {getattr(job.params, name)}"
                )


class Pack:
    """K jobs' weights, gradients and Adam moments stacked as [K, ...] tensors, a row per job.

    Adam runs torch's own kernel (fused on a CPU or CUDA, as solo) once per row with the row's
    learning rate: a single pass over memory, bit for bit the solo update given the same
    gradients, and on a CPU four times faster than the same arithmetic spelled as [K, P]
    tensor operations with a [K, 1] learning rate (nine passes over memory). Rows are addressed
    by the job's index in the list the pack was made from, which stays valid as jobs leave
    (:meth:`drop`).
    """

    def __init__(
        self,
        jobs: Sequence[PackedJob],
        data: Mnist,
        device: torch.device,
        graphs: GraphBackend | None = None,
    ) -> None:
        _check_compatible(jobs)
        params = jobs[0].params
        self.device = device
        self.epochs, self.batch_size = params.epochs, params.batch_size
        train = data.train.first(params.trainset_size, "trainset_size")
        test = data.test.first(params.testset_size, "testset_size")
        self.images = train.images.reshape(len(train.labels), -1)
        self.labels = train.labels
        self.test_images = test.images.reshape(len(test.labels), -1)
        self.test_labels = test.labels

        self.solos = [_solo_setup(job, device) for job in jobs]
        self.reports = [job.report for job in jobs]
        self.members = list(range(len(jobs)))  # the job index of each row
        done = {solo.done_epochs for solo in self.solos}
        if len(done) != 1:
            raise Unpackable(f"jobs in one pack must resume from the same epoch, not {done}")
        self.done_epochs = done.pop()
        optimizer = self.solos[0].state.optimizer
        if not optimizer.defaults["fused"]:
            raise Unpackable(f"packed training needs Adam's fused kernel, which {device} lacks")
        settings = optimizer.defaults
        if settings["weight_decay"] or settings["amsgrad"] or settings["maximize"]:
            raise Unpackable("packed training implements plain Adam only")
        (self.beta1, self.beta2), self.eps = settings["betas"], settings["eps"]
        # As solo: the learning rate Adam holds, the job's own or, resumed, the saved one.
        self.lrs = [s.state.optimizer.param_groups[0]["lr"] for s in self.solos]
        models = [s.state.model for s in self.solos]
        with torch.no_grad():
            self.weights = [
                torch.stack(layer) for layer in zip(*(m.parameters() for m in models), strict=True)
            ]
        self.grads = [torch.zeros_like(w) for w in self.weights]
        states = [
            [s.state.optimizer.state[p] for p in s.state.model.parameters()] for s in self.solos
        ]
        self.exp_avg = self._stacked_moment(states, "exp_avg")
        self.exp_avg_sq = self._stacked_moment(states, "exp_avg_sq")
        # Adam's step count (float32, on the device, as fused Adam keeps it): the same for all.
        counts = {int(st["step"]) if "step" in st else 0 for row in states for st in row}
        if len(counts) != 1:
            raise Unpackable(f"jobs in one pack must have taken as many steps, not {counts}")
        self.step_count = torch.full((), counts.pop(), dtype=torch.float32, device=device)
        self._index_rows()
        self.orders: torch.Tensor | None = None  # this epoch's batches, one row per job
        self._graphs = graphs
        self._stepper: Step | None = None  # the step, graphed or not: made again after a drop

    def _stacked_moment(self, states: list[list[dict[str, Any]]], name: str) -> list[torch.Tensor]:
        """A moment of every job as one [K, ...] tensor per parameter (zero before any step)."""
        return [
            torch.stack(
                [row[i][name] if name in row[i] else torch.zeros_like(w[0]) for row in states]
            )
            for i, w in enumerate(self.weights)
        ]

    @property
    def size(self) -> int:
        """How many jobs are still in the pack."""
        return len(self.members)

    def drop(self, job: int) -> None:
        """Take job ``job`` out of the pack; the others' rows, and numbers, stay as they were.

        Its row is gone: what the job keeps (:meth:`unstack`, :meth:`state`) is taken before."""
        row = self.members.index(job)
        index = torch.tensor(
            [r for r in range(self.size) if r != row], dtype=torch.long, device=self.device
        )
        for stacked in (self.weights, self.grads, self.exp_avg, self.exp_avg_sq):
            stacked[:] = [t.index_select(0, index) for t in stacked]
        if self.orders is not None:
            self.orders = self.orders.index_select(0, index)
        del self.members[row], self.lrs[row]
        self._index_rows()
        self._stepper = None  # a graph holds the old rows' tensors

    def _index_rows(self) -> None:
        """Each row's weights, gradients and moments, as the per-row Adam calls take them."""
        stacks = (self.weights, self.grads, self.exp_avg, self.exp_avg_sq)
        self.rows = [[[t[row] for t in stacked] for stacked in stacks] for row in range(self.size)]

    def _sync_out(self, job: int) -> _Solo:
        """Copy job ``job``'s row into its own SimpleMLP and Adam, as a solo run holds them."""
        row = self.members.index(job)
        solo = self.solos[job]
        model, optimizer = solo.state.model, solo.state.optimizer
        with torch.no_grad():
            for i, p in enumerate(model.parameters()):
                p.copy_(self.weights[i][row])
                optimizer.state[p] = {
                    "step": self.step_count.clone(),
                    "exp_avg": self.exp_avg[i][row].clone(),
                    "exp_avg_sq": self.exp_avg_sq[i][row].clone(),
                }
        return solo

    def unstack(self, job: int) -> SimpleMLP:
        """Job ``job``'s model with its current weights: what a solo run would have now."""
        return self._sync_out(job).state.model

    def state(self, job: int) -> PackedJobState:
        """Job ``job``'s training state now, to resume it solo or in another pack."""
        state = self._sync_out(job).state
        torch_rng = self.solos[job].torch_rng
        return PackedJobState(state.model, state.optimizer, state.shuffle, torch_rng)

    def shuffle(self) -> None:
        """Each job draws its epoch's order from its own generator, as a solo run does."""
        n = len(self.labels)
        self.orders = torch.stack(
            [
                torch.randperm(n, generator=self.solos[job].state.shuffle, device=self.device)
                for job in self.members
            ]
        )

    def step(self, start: int) -> torch.Tensor:
        """One optimiser step of every job on its batch at ``start``; the K losses.

        With ``graphs`` (a CUDA device, :mod:`workers.training.graphs`) full batches replay
        the step captured once (again after a job leaves: the rows' tensors are new)."""
        assert self.orders is not None
        if self._stepper is None:
            self._stepper = graphed(
                self._step,
                batch_size=(self.size, self.batch_size),
                device=self.device,
                state=[
                    *self.weights,
                    *self.grads,
                    *self.exp_avg,
                    *self.exp_avg_sq,
                    self.step_count,
                ],
                backend=self._graphs,
            )
        return self._stepper(self.orders[:, start : start + self.batch_size])

    @torch.no_grad()
    def _step(self, batch: torch.Tensor) -> torch.Tensor:
        """:meth:`step` on each job's batch ``batch`` [K, B] (the last may be short).

        The three parts are labelled for ``torch.profiler`` (benchmarks/packing.py splits a
        step's time by them)."""
        with record_function("pack.forward"):
            x, y, hidden, log_probs = self._forward(batch)
            losses = log_probs.gather(2, y).view(batch.shape).mean(dim=1).neg_()
        with record_function("pack.backward"):
            self._backward(x, y, hidden, log_probs)
        with record_function("pack.adam"):
            self._adam()
        return losses

    def _forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each job's batch [K, B, 784], labels [K, B, 1], hidden layer and log-probabilities."""
        k, b = batch.shape
        x = self.images.index_select(0, batch.reshape(-1)).view(k, b, -1)
        y = self.labels.index_select(0, batch.reshape(-1)).view(k, b, 1)
        w1, b1, w2, b2 = self.weights
        hidden = torch.baddbmm(b1.unsqueeze(1), x, w1.transpose(1, 2)).relu_()
        logits = torch.baddbmm(b2.unsqueeze(1), hidden, w2.transpose(1, 2))
        return x, y, hidden, logits.log_softmax(dim=2)

    def _backward(
        self, x: torch.Tensor, y: torch.Tensor, hidden: torch.Tensor, log_probs: torch.Tensor
    ) -> None:
        """Each job's mean cross entropy's gradients, into the gradient buffers (consumes
        ``log_probs``). d loss / d logits = (softmax - onehot) / B, as autograd computes it."""
        k, b, _ = y.shape
        dlogits = log_probs.exp_().mul_(1.0 / b)
        onehot = torch.full((1, 1, 1), -1.0 / b, device=self.device).expand(k, b, 1)
        dlogits.scatter_add_(2, y, onehot)
        gw1, gb1, gw2, gb2 = self.grads
        torch.bmm(dlogits.transpose(1, 2), hidden, out=gw2)
        torch.sum(dlogits, dim=1, out=gb2)
        dhidden = torch.ops.aten.threshold_backward(
            torch.bmm(dlogits, self.weights[2]), hidden, 0.0
        )
        torch.bmm(dhidden.transpose(1, 2), x, out=gw1)
        torch.sum(dhidden, dim=1, out=gb1)

    def _adam(self) -> None:
        """Adam, row by row with the row's learning rate: the kernel a solo run's Adam calls,
        without ``Optimizer.step``'s per-group bookkeeping, which costs as much as the update
        itself here. The kernel only reads the step count: all rows share one."""
        self.step_count.add_(1)
        steps = [self.step_count] * len(self.weights)
        for lr, (weights, grads, exp_avg, exp_avg_sq) in zip(self.lrs, self.rows, strict=True):
            torch._fused_adam_(
                weights, grads, exp_avg, exp_avg_sq, [], steps,
                lr=lr, beta1=self.beta1, beta2=self.beta2, eps=self.eps,
                weight_decay=0.0, amsgrad=False, maximize=False,
            )  # fmt: skip

    @torch.inference_mode()
    def evaluate(self) -> list[float]:
        """Each job's test accuracy, in row order: correct argmax / test size."""
        k, (t, features) = self.size, self.test_images.shape
        w1, b1, w2, b2 = self.weights
        x = self.test_images.expand(k, t, features)
        hidden = torch.baddbmm(b1.unsqueeze(1), x, w1.transpose(1, 2)).relu_()
        logits = torch.baddbmm(b2.unsqueeze(1), hidden, w2.transpose(1, 2))
        correct = (logits.argmax(dim=2) == self.test_labels).sum(dim=1).tolist()
        return [int(c) / t for c in correct]


def train_packed(
    jobs: Sequence[PackedJob],
    data: Mnist,
    device: torch.device,
    graphs: GraphBackend | None = None,
) -> list[SimpleMLP | Exception]:
    """Train ``jobs`` as one pack; for each, its trained model or the error it left with.

    A job leaves when its report raises (as a solo run would stop); the pack goes on with the
    rest. Each report sees what it would see solo: one loss per step, one accuracy and state
    per epoch. ``graphs``: full batches replay a captured step (a CUDA device).
    """
    pack = Pack(jobs, data, device, graphs)
    outcomes: dict[int, SimpleMLP | Exception] = {}

    def results() -> list[SimpleMLP | Exception]:
        return [outcomes[j] for j in range(len(jobs))]

    @contextmanager
    def leaves_on_error(job: int) -> Iterator[None]:
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - the job's own ending; the caller reads it
            outcomes[job] = exc

    def leave() -> bool:
        """Drop the jobs that ended; whether any is left."""
        for job in [j for j in pack.members if j in outcomes]:
            pack.drop(job)
        return pack.size > 0

    n = len(pack.labels)
    for epoch in range(pack.done_epochs + 1, pack.epochs + 1):
        pack.shuffle()
        for start in range(0, n, pack.batch_size):
            losses = pack.step(start)
            for job, loss in zip(list(pack.members), losses.unbind(0), strict=True):
                with leaves_on_error(job):
                    pack.reports[job].step(loss)
            if not leave():
                return results()
        accuracies = pack.evaluate()
        for job, accuracy in zip(list(pack.members), accuracies, strict=True):
            with leaves_on_error(job):
                pack.reports[job].epoch(epoch, accuracy, pack.state(job))
        if not leave():
            return results()
    for job in pack.members:
        outcomes[job] = pack.unstack(job)
    return results()
