"""jobs: the sweep's index holds each trial's status (ix_jobs_sweep_id_status)

Revision ID: 0010
Revises: 0009
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0010"
down_revision: str | Sequence[str] | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision.

    Every write that ends a trial asks whether any trial of its sweep is still queued or
    running. Through ``sweep_id`` alone that read every ended trial before the first
    unfinished one (late in a sweep, nearly all of them, at every trial's end: a sweep's cost
    grew with the square of its trials); with the status beside it in the index, one probe.
    It answers whatever the old index answered (``sweep_id`` leads it).
    """
    op.create_index(op.f("ix_jobs_sweep_id_status"), "jobs", ["sweep_id", "status"], unique=False)
    op.drop_index(op.f("ix_jobs_sweep_id"), table_name="jobs")


def downgrade() -> None:
    """Revert this revision."""
    op.create_index(op.f("ix_jobs_sweep_id"), "jobs", ["sweep_id"], unique=False)
    op.drop_index(op.f("ix_jobs_sweep_id_status"), table_name="jobs")
