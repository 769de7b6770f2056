"""The jobs service layer: what the routes ask for, in domain terms, over the repository."""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import orjson
from pydantic import TypeAdapter
from sqlalchemy import Row
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from service.clock import utcnow
from service.errors import Conflict, InvalidInput, TooManyRequests
from service.schemas import JobCreate, JobList, JobRead
from service.status import TERMINAL, JobStatus
from service.steps import StepPlan
from service.store import availability, job_repo, metric_repo
from service.store.engines import Reader
from service.store.outage import is_outage, retry
from service.store.tables import Job

# The columns of a job's metrics as CSV, as `mnist-service metrics --csv` writes them too.
CSV_COLUMNS = ("step", "epoch", "examples_seen", "loss", "test_accuracy")
# Steps read at a time for the CSV: every step of a job goes out, in pages this long (each
# about 4 MB of rows in memory while it is written).
CSV_READ_STEPS = 10_000
# How long a CSV download waits out an outage between its pages before it is cut short.
CSV_OUTAGE_WAIT_S = 60.0

# A full queue drains at the pace of training; a client should not come back at once.
QUEUE_FULL_RETRY_AFTER_S = 30


# A job as stored: its ORM instance, or its columns read without the ORM (the polls' fast lane).
JobColumns = Job | Row[Any] | SimpleNamespace
JOB_READ: TypeAdapter[JobRead] = TypeAdapter(JobRead)


def params_of(job: JobColumns) -> JobCreate:
    """The hyperparameters stored on a job row: each of JobCreate's fields in the column of
    its name (:func:`service.store.job_repo.create_job` stores them so)."""
    return JobCreate.model_validate({name: getattr(job, name) for name in JobCreate.model_fields})


def to_read(job: JobColumns) -> JobRead:
    """A job row as the API shows it."""
    return JobRead(
        id=job.id,
        status=job.status,
        params=params_of(job),
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        epoch=job.epoch,
        step=job.step,
        total_steps=job.total_steps,
        accuracy=job.accuracy,
        device=job.device,
        error=job.error,
        attempt=job.attempt,
        max_attempts=job.max_attempts,
        worker=job.worker_id,
        heartbeat_at=job.heartbeat_at if job.status == JobStatus.RUNNING else None,
        sweep_id=job.sweep_id,
    )


def job_json(db: Reader, job_id: str) -> bytes | None:
    """A job as ``GET /jobs/{id}`` answers it, encoded as FastAPI encodes the route's
    :class:`JobRead`, read without the ORM; None when there is no such job.

    The polls' fast lane (:mod:`service.api.lanes.polls`) answers with this; the route, which
    reads the ORM instance, stays the reference (tests/service/api/lanes/test_differential.py).
    """
    row = job_repo.job_row(db, job_id)
    return None if row is None else JOB_READ.dump_json(to_read(row))


def check_steps(params: JobCreate, *, max_steps: int) -> None:
    """422 when the job would record more than ``max_steps`` steps (``MNIST_MAX_JOB_STEPS``):
    the storage budget of one job, counted by :class:`StepPlan`, as its ``total_steps`` is."""
    steps = StepPlan.of(params).total_steps
    if steps > max_steps:
        raise InvalidInput(
            f"this job would record {steps} training steps (epochs × ceil(trainset_size / "
            f"batch_size)), more than the {max_steps} one job may record "
            "(MNIST_MAX_JOB_STEPS): use fewer epochs, a larger batch_size or a smaller "
            "trainset_size",
            details=[
                {
                    "loc": ["body"],
                    "msg": f"{steps} steps, at most {max_steps}",
                    "type": "too_many_steps",
                    "steps": steps,
                    "max_steps": max_steps,
                }
            ],
        )


def check_queue_room(session: Session, *, adding: int, max_queued: int) -> None:
    """429 (``Retry-After``) when ``adding`` more queued jobs would make more than
    ``max_queued`` (``MNIST_MAX_QUEUED_JOBS``) wait: the one queue cap, of jobs and sweeps'
    trials alike. Run in the transaction that inserts them (see :func:`submit`). More than the
    cap at once can never wait, however long the client waits: 422."""
    if adding > max_queued:
        raise InvalidInput(
            f"{adding} jobs at once can never wait in the queue, which holds at most "
            f"{max_queued} (MNIST_MAX_QUEUED_JOBS): submit fewer trials"
        )
    queued = job_repo.count_queued_for_adding(session)
    if queued + adding > max_queued:
        waiting = "" if adding == 1 else f"; these {adding} would make {queued + adding}"
        raise TooManyRequests(
            f"the queue is full: {queued} jobs are waiting (at most {max_queued}){waiting}; "
            f"try again in {QUEUE_FULL_RETRY_AFTER_S} s",
            retry_after_s=QUEUE_FULL_RETRY_AFTER_S,
        )


def submit(
    session: Session, params: JobCreate, *, max_attempts: int, max_queued: int, max_steps: int
) -> JobRead:
    """Queue a training job; 422 over the steps budget (:func:`check_steps`), 429 while
    ``max_queued`` jobs are already waiting.

    The count and the insert share the write transaction, which queues one at a time (on
    SQLite as any write, on PostgreSQL behind a lock): the cap is exact on both.
    """
    check_steps(params, max_steps=max_steps)
    check_queue_room(session, adding=1, max_queued=max_queued)
    job = job_repo.create_job(session, params, max_attempts=max_attempts, now=utcnow())
    session.commit()
    return to_read(job)


def list_page(
    session: Session, *, status: JobStatus | None, limit: int, cursor: str | None
) -> JobList:
    """A page of jobs, newest first."""
    jobs, next_cursor = job_repo.list_jobs(session, status=status, limit=limit, cursor=cursor)
    return JobList(jobs=[to_read(j) for j in jobs], next=next_cursor)


def metrics_page(db: Reader, job_id: str, *, after_step: int, limit: int) -> dict[str, Any] | None:
    """Steps after ``after_step`` and every epoch, as the dict of :class:`MetricsRead`; None
    when there is no such job.

    The status is read first: if it says the job has ended, the steps read after it are all
    there are, so a client that stops polling on a terminal status misses none. The attempt
    is read with it, and again after the steps when there are any (attempts only grow, so the
    later one names the run of the steps read before it): a client that pages with
    ``after_step`` starts over from 0 when it changes (a retry records a new run's steps, from
    its resume point or the first), or it would splice two runs into one series. Built straight
    from the driver's rows: on a 10,000-step page, building and validating the Pydantic models
    took most of the request's time (docs/benchmarks.md). Tests check the body against
    :class:`MetricsRead`.
    """
    state = metric_repo.job_state(db, job_id)
    if state is None:
        return None
    status, attempt = state
    steps = metric_repo.read_steps(db, job_id, after_step=after_step, limit=limit)
    if steps:  # named by the run they are of: a claim (its rewind and its attempt are one
        # commit) may land between two reads, each its own snapshot on PostgreSQL
        attempt = (metric_repo.job_state(db, job_id) or state)[1]
    return {
        "job_id": job_id,
        "status": status,
        "attempt": attempt,
        "steps": steps,
        "epochs": metric_repo.read_epochs(db, job_id),
        "next_after_step": steps[-1]["step"] if steps else after_step,
    }


def metrics_json(db: Reader, job_id: str, *, after_step: int, limit: int) -> bytes | None:
    """:func:`metrics_page` as JSON (orjson); None when there is no such job.

    The route and the polls' fast lane (:mod:`service.api.lanes.polls`) both answer with this.
    """
    page = metrics_page(db, job_id, after_step=after_step, limit=limit)
    return None if page is None else encode_metrics(page)


def encode_metrics(page: dict[str, Any]) -> bytes:
    """A :func:`metrics_page` as the API sends it."""
    return orjson.dumps(page)


class DownloadCutShort(Exception):
    """A job's CSV could not be written whole: the job was deleted, or began another run (its
    steps start over), or the database stayed away, while it went out. The download must end
    unfinished, not as if the rows sent were all there are."""


def metrics_csv(sessions: sessionmaker[Session], job_id: str) -> Iterator[str] | None:
    """Every recorded step as CSV (:data:`CSV_COLUMNS`), an epoch's test accuracy on the row of
    its last step, in pieces; None when there is no such job.

    The dashboard links to it: a spreadsheet or pandas reads a whole run in one download,
    without paging through the JSON. Losses are written exactly (Python's shortest repr).
    Written a page of :data:`CSV_READ_STEPS` at a time, each read in a session of its own: the
    whole CSV built at once took 330 MB of the API's memory for a job of 960,000 steps, for
    each download at once. The job and its first page are read now, so that an outage then is
    still a 503; a later page waits out an outage for :data:`CSV_OUTAGE_WAIT_S`, and raises
    :class:`DownloadCutShort` where the rest is not to be had.
    """
    with sessions() as db:
        state = metric_repo.job_state(db, job_id)
        if state is None:
            return None
        first = _csv_page(db, job_id, after=0)
    return _csv_pieces(sessions, job_id, state[1], first)


_CsvPage = tuple[list[dict[str, Any]], dict[int, float]]


def _csv_page(db: Reader, job_id: str, *, after: int) -> _CsvPage:
    page = metric_repo.read_steps(db, job_id, after_step=after, limit=CSV_READ_STEPS)
    # After the page: an epoch whose steps it holds has its accuracy, if it has one.
    return page, {e["epoch"]: e["accuracy"] for e in metric_repo.read_epochs(db, job_id)}


def _next_csv_page(
    sessions: sessionmaker[Session], job_id: str, attempt: int, *, after: int
) -> _CsvPage:
    def read() -> _CsvPage:
        with sessions() as db:
            state = metric_repo.job_state(db, job_id)
            if state is None or state[1] != attempt:
                raise DownloadCutShort(f"job {job_id} was deleted or ran again meanwhile")
            return _csv_page(db, job_id, after=after)

    began = time.monotonic()
    try:
        return retry(
            read,
            outage=availability.API_OUTAGE,
            what="a CSV download",
            give_up=lambda: time.monotonic() - began > CSV_OUTAGE_WAIT_S,
        )
    except SQLAlchemyError as exc:
        if not is_outage(exc):
            raise
        raise DownloadCutShort(f"the database was away for {CSV_OUTAGE_WAIT_S:g} s") from exc


def _csv_pieces(
    sessions: sessionmaker[Session], job_id: str, attempt: int, first: _CsvPage
) -> Iterator[str]:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    held: dict[str, Any] | None = None  # a row is written once the next says if it ends its epoch
    page, accuracy = first

    def write(row: dict[str, Any], *, last_of_epoch: bool) -> None:
        shown = accuracy.get(row["epoch"], "") if last_of_epoch else ""
        writer.writerow([row["step"], row["epoch"], row["examples_seen"], repr(row["loss"]), shown])

    while True:
        for row in page:
            if held is not None:
                write(held, last_of_epoch=row["epoch"] != held["epoch"])
            held = row
        if len(page) < CSV_READ_STEPS:
            break
        yield out.getvalue()
        out.seek(0)
        out.truncate()
        page, accuracy = _next_csv_page(sessions, job_id, attempt, after=page[-1]["step"])
    if held is not None:
        write(held, last_of_epoch=True)
    yield out.getvalue()


def cancel(session: Session, job: Job) -> JobRead:
    """Cancel a queued job now, or ask a running job's worker to stop; 409 once it has ended."""
    if job.status in TERMINAL:
        raise Conflict(f"job {job.id} has already ended ({job.status}); nothing to cancel")
    job = job_repo.request_cancel(session, job, now=utcnow())
    session.commit()
    return to_read(job)
