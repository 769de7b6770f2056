"""workers: no job_id column; a worker's jobs are the running jobs that name it

Revision ID: 0008
Revises: 0007
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision.

    ``GET /workers`` reads a worker's jobs from ``jobs.worker_id`` (a pack's worker holds
    several), so nothing read this column any more, while every claim and every job's end
    paid a statement to write it (a round trip inside the claim a queued job waits for).
    Workers and APIs of older code write it: stop them before migrating (their claims and job
    ends would fail on the missing column; a job so stopped is claimed again once its lease
    runs out).
    """
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("fk_workers_job_id_jobs"), type_="foreignkey")
        batch_op.drop_column("job_id")


def downgrade() -> None:
    """Revert this revision: the column comes back empty (workers fill it at their next claim
    under the older code)."""
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("job_id", sa.String(length=32), nullable=True))
        batch_op.create_foreign_key(
            op.f("fk_workers_job_id_jobs"), "jobs", ["job_id"], ["id"], ondelete="SET NULL"
        )
