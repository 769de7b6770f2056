"""ORM tables: jobs, the loss of every training step, the accuracy after every epoch, and the
weights and training states kept in the database (``MNIST_ARTIFACTS=database``)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from service.status import JobStatus

# The largest value of an ``Integer`` column on every backend (32 bits on PostgreSQL): a step,
# an epoch or an attempt from a client beyond it names nothing, and must be refused (422)
# before it reaches a query, where PostgreSQL would fail on it.
MAX_INTEGER = 2**31 - 1

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite keeps no zone of its own)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        """Aware datetime → naive UTC for storage."""
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        """Stored naive UTC → aware datetime."""
        return None if value is None else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    """Declarative base whose metadata names every constraint predictably (for migrations)."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class StatusColumn(TypeDecorator[JobStatus]):
    """A job's status stored as its plain string and read back as :class:`JobStatus`."""

    impl = String(16)
    cache_ok = True

    def process_bind_param(self, value: JobStatus | str | None, dialect: Any) -> str | None:
        """Checked on the way in: a status outside the enum never reaches the table."""
        return None if value is None else JobStatus(value).value

    def process_result_value(self, value: str | None, dialect: Any) -> JobStatus | None:
        """The stored string as the enum."""
        return None if value is None else JobStatus(value)


class Job(Base):
    """A training job: its parameters, its progress and its place in the queue."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    status: Mapped[JobStatus] = mapped_column(StatusColumn(), default=JobStatus.QUEUED)

    # The hyperparameters, defaults filled in.
    epochs: Mapped[int] = mapped_column(Integer)
    batch_size: Mapped[int] = mapped_column(Integer)
    learning_rate: Mapped[float] = mapped_column(Float)
    trainset_size: Mapped[int] = mapped_column(Integer)
    testset_size: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int | None] = mapped_column(BigInteger, nullable=True)

    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    # Progress.
    epoch: Mapped[int] = mapped_column(Integer, default=0)
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int] = mapped_column(Integer)
    accuracy: Mapped[float | None] = mapped_column(Float, nullable=True)
    device: Mapped[str | None] = mapped_column(String(32), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    checkpoint: Mapped[str | None] = mapped_column(String(255), nullable=True)
    max_runtime_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    # The last finished epoch's training state (model, optimizer, RNG): a retry resumes here.
    resume_checkpoint: Mapped[str | None] = mapped_column(String(255), nullable=True)
    resume_epoch: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    # The queue: who holds the job, for which attempt, until when.
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer)
    # How often a worker's host gave the job back (queue_repo.hand_back): the first
    # FREE_HOST_FAULTS of them spend none of its attempts.
    host_faults: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    worker_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # The sweep this job is a trial of; None for a job submitted alone.
    sweep_id: Mapped[str | None] = mapped_column(ForeignKey("sweeps.id"), nullable=True)

    __table_args__ = (
        Index("ix_jobs_status_created_at", "status", "created_at"),
        Index("ix_jobs_created_at_id", "created_at", "id"),
        Index("ix_jobs_finished_at", "finished_at"),
        # A sweep's trials, and whether any is unfinished in one probe (its settling).
        Index("ix_jobs_sweep_id_status", "sweep_id", "status"),
    )


class Sweep(Base):
    """A search over job parameters whose trials are ordinary jobs (``jobs.sweep_id``).

    ``status`` is ``running`` until every trial has ended, then settled once
    (:func:`service.store.sweeps.repo.settle`) by whichever transaction ends the last one.
    """

    __tablename__ = "sweeps"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    status: Mapped[str] = mapped_column(String(16))  # a SweepStatus
    params: Mapped[dict[str, Any]] = mapped_column(JSON)  # the base JobCreate
    search: Mapped[dict[str, Any]] = mapped_column(JSON)  # {"grid": …} or {"random": …}
    promote: Mapped[str | None] = mapped_column(String(64), nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    __table_args__ = (Index("ix_sweeps_created_at_id", "created_at", "id"),)


class TrainStep(Base):
    """The cross-entropy loss of one optimisation step; steps count 1..total_steps."""

    __tablename__ = "train_steps"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    epoch: Mapped[int] = mapped_column(Integer)
    loss: Mapped[float] = mapped_column(Float)
    examples_seen: Mapped[int] = mapped_column(Integer)


class EpochMetric(Base):
    """The test accuracy measured after one epoch."""

    __tablename__ = "epoch_metrics"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    epoch: Mapped[int] = mapped_column(Integer, primary_key=True)
    accuracy: Mapped[float] = mapped_column(Float)
    examples_seen: Mapped[int] = mapped_column(Integer)


class WorkerRow(Base):
    """A worker process: where it runs and when it last spoke (its jobs name it)."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    # Where ``pid`` names a process: its kernel's boot and PID namespace (workers.host).
    pid_space: Mapped[str | None] = mapped_column(String(64), nullable=True)
    pid: Mapped[int] = mapped_column(Integer)
    device: Mapped[str] = mapped_column(String(32))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime())
    stopped_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    __table_args__ = (Index("ix_workers_heartbeat_at", "heartbeat_at"),)


class ModelAlias(Base):
    """A name (e.g. ``production``) pointing at the model of one succeeded job."""

    __tablename__ = "model_aliases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class ReadinessProbe(Base):
    """One row that ``/readyz`` writes (at most every ``MNIST_READY_WRITE_PROBE_S``) to learn
    that the database takes writes: a read-only file, replica or full disk fails it."""

    __tablename__ = "readiness_probe"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    written_at: Mapped[datetime] = mapped_column(UTCDateTime())


class Artifact(Base):
    """A checkpoint or training state stored in the database (``MNIST_ARTIFACTS=database``).

    Written in the transaction of the job's row that names it (``jobs.checkpoint`` or
    ``jobs.resume_checkpoint``, as ``db:<name>``): a reader never sees a name without its
    bytes, nor half of the bytes.
    """

    __tablename__ = "artifacts"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # "checkpoint" or "resume"
    attempt: Mapped[int] = mapped_column(Integer)
    epoch: Mapped[int | None] = mapped_column(Integer, nullable=True)  # resume: saved after it
    size_bytes: Mapped[int] = mapped_column(Integer)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class Housekeeping(Base):
    """When a periodic chore (``retention``) last ran, cluster-wide: whoever moves
    ``last_run_at`` forward with a conditional update runs it, so one process per period does."""

    __tablename__ = "housekeeping"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    last_run_at: Mapped[datetime] = mapped_column(UTCDateTime())
