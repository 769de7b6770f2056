"""jobs: how often a worker's host gave the job back (host_faults)

Revision ID: 0011
Revises: 0010
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | Sequence[str] | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision.

    A fault of a worker's host (its checkpoint folder full or read-only, MNIST unreadable)
    gives the job back without spending an attempt, but only so often: with no count, a fault
    that lasted on every host gave every job back for good, never failed, its sweep never
    ended. Jobs of older code have none.
    """
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("host_faults", sa.Integer(), server_default="0", nullable=False)
        )


def downgrade() -> None:
    """Revert this revision."""
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("host_faults")
