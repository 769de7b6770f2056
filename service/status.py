"""A job's states: one enum for the tables, the schemas, the workers and the CLI."""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    """The states of a job's life; terminal ones never change again."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})


class SweepStatus(StrEnum):
    """The states of a sweep: running while any trial is queued or running, then how it
    ended (a sweep is never queued itself: its trials are)."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
