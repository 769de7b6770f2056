"""The packed path: jobs claimed together (``MNIST_PACK_MAX`` > 1) trained as one pack.

Each job keeps everything it has alone: its claim and fence, its reporter (its steps and
epochs under its id, its cancel, runtime limit and divergence checks), its lease (the heartbeat
renews every job's), its resume point, its checkpoint and its ending, recorded by the same
:class:`workers.endings.Endings` as a solo job's. A job whose reporter raises ends at once,
its row saying so while the others train on (:func:`workers.training.packing.train_packed`
then drops it). A pack whose jobs would resume from different epochs (a saved state has gone
missing, so one starts over) trains as groups of one epoch, one after another; the claim
(:func:`service.store.packs.claim_more`) already takes only jobs resuming where the first does.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from service.logs import log_context
from service.ml import SimpleMLP
from service.schemas import JobCreate
from service.store.tables import Job
from workers.endings import Outcome, raises, returns
from workers.reporting import Claim, Reporter, Shutdown
from workers.resume import SavedState, TrainingState
from workers.training.graphs import GraphBackend, graph_backend
from workers.training.packing import PackedJob, Unpackable, train_packed
from workers.training.train import train

if TYPE_CHECKING:
    from workers.worker import Worker

log = logging.getLogger("workers")


def packs_on(device: torch.device) -> bool:
    """Whether jobs can be packed on ``device``: the pack's Adam is the fused kernel."""
    return device.type in ("cpu", "cuda")


@dataclass
class _Member:
    """One job of the pack, and how it ended once it has."""

    job: Job
    claim: Claim
    params: JobCreate
    seed: int
    reporter: Reporter
    resume_from: SavedState | None = None
    done_epochs: int = 0
    outcome: Outcome | None = None


class _Pack:
    """The pack's jobs, ending one by one; the heartbeat renews the leases of those left."""

    def __init__(self, worker: Worker, jobs: list[Job]) -> None:
        self.worker = worker
        # One job's reporter times the pack's steps for the thread tuner (a pack's step gives
        # the same bits at every count the tuner keeps: tests/workers/tuning/test_threads.py), so a
        # pack trains at the count its own steps run fastest at; 8 jobs' products are wide
        # enough that two threads nearly halve a step on two quiet cores (docs/benchmarks.md).
        self.members = [
            _Member(job, *worker.start_job(job, tune_threads=i == 0)) for i, job in enumerate(jobs)
        ]
        self._training: list[_Member] = []  # the group training now (:meth:`train`)
        self._beat()

    @property
    def running(self) -> list[_Member]:
        """The jobs that have not ended."""
        return [m for m in self.members if m.outcome is None]

    def _beat(self) -> None:
        self.worker.heartbeat.reporters = tuple(m.reporter for m in self.running)

    def end(self, member: _Member, train: Callable[[], SimpleMLP]) -> None:
        """Record how ``member`` ended (what ``train`` returns or raises) and let it go."""
        with log_context(job_id=member.claim.job_id, attempt=member.claim.attempt):
            member.outcome = self.worker.endings.conclude(member.claim, member.reporter, train)
        self._beat()
        member.reporter.close()
        tuner, left = member.reporter.tuner, self.running
        if tuner is not None and left:  # the pack's steps stay timed: another job times them
            training = [m for m in left if any(m is t for t in self._training)] or left
            training[0].reporter.time_steps_for(tuner)

    def resume(self) -> None:
        """Each job's resume point, as a solo attempt finds it (or ends, when it cannot)."""
        for m in self.members:
            try:
                m.resume_from = self.worker.resume_point(m.job, m.claim, m.reporter)
            except Exception as exc:  # noqa: BLE001 - the job's own ending: Endings maps it
                self.end(m, raises(exc))
                continue
            m.done_epochs = m.job.resume_epoch if m.resume_from is not None else 0

    def train(self, group: list[_Member]) -> None:
        """Train ``group`` (one resume epoch) as one pack; end each job as it leaves."""
        if self.worker.stop.is_set():  # a later group, after a stop request: all go back
            for m in group:
                self.end(m, raises(Shutdown("worker is shutting down; the job did not start")))
            return
        log.info(
            "packing %d jobs on %s%s: %s",
            len(group),
            self.worker.device,
            f", resuming after epoch {group[0].done_epochs}" if group[0].done_epochs else "",
            ", ".join(f"{m.claim.job_id} attempt {m.claim.attempt}" for m in group),
        )
        self._training = group
        jobs = [PackedJob(m.params, m.seed, _Report(self, m), m.resume_from) for m in group]
        graphs = graph_backend(self.worker.device, self.worker.settings.cuda_graphs)
        try:
            results = train_packed(jobs, self.worker.data(), self.worker.device, graphs)
        except Unpackable as exc:  # before any step: each trains alone, as a solo claim would
            log.warning("these jobs cannot share a pack (%s): each trains alone", exc)
            for m in group:
                self.end(m, functools.partial(self._alone, m, graphs))
            return
        except Exception as exc:  # noqa: BLE001 - the pack could not go on: every job's end
            results = [exc] * len(group)
        for m, result in zip(group, results, strict=True):
            if m.outcome is None:
                self.end(m, raises(result) if isinstance(result, Exception) else returns(result))

    def _alone(self, m: _Member, graphs: GraphBackend | None) -> SimpleMLP:
        """``m`` trained by the solo loop, with its own reporter and resume point."""
        data, device = self.worker.data(), self.worker.device
        return train(m.params, data, device, m.seed, m.reporter, m.resume_from, graphs)

    def close(self) -> None:
        """Let the jobs that never ended go (a bug, or the worker's exit, stopped the pack)."""
        self.worker.heartbeat.reporters = ()
        for m in self.running:
            m.reporter.close()


class _Report:
    """A pack job's report: its own reporter, and its ending recorded the moment it leaves."""

    def __init__(self, pack: _Pack, member: _Member) -> None:
        self._pack, self._member = pack, member

    @contextmanager
    def _ends_on_error(self) -> Iterator[None]:
        """What the job's reporter raises ends the job (then takes it out of the pack)."""
        try:
            yield
        except Exception as exc:
            self._pack.end(self._member, raises(exc))
            raise

    def step(self, loss: torch.Tensor) -> None:
        """As the job's reporter."""
        with self._ends_on_error():
            self._member.reporter.step(loss)

    def epoch(self, epoch: int, accuracy: float, state: TrainingState) -> None:
        """As the job's reporter."""
        with self._ends_on_error():
            self._member.reporter.epoch(epoch, accuracy, state)


def run_pack(worker: Worker, jobs: list[Job]) -> list[Outcome]:
    """Train ``jobs`` (claimed together) as packs and record how each ended, in ``jobs``'
    order; never raises for a job's own faults."""
    pack = _Pack(worker, jobs)
    try:
        pack.resume()
        epochs = sorted({m.done_epochs for m in pack.running})
        for epoch in epochs:
            pack.train([m for m in pack.running if m.done_epochs == epoch])
    finally:
        pack.close()
    return [m.outcome for m in pack.members if m.outcome is not None]
