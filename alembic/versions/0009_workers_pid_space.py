"""workers: the pid space a worker's pid is a process of (its kernel's boot and PID namespace)

Revision ID: 0009
Revises: 0008
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision.

    A starting worker ends the jobs of the workers of its host whose pids no longer run. The
    hostname alone did not say where a pid runs: containers on the host's network share it,
    each with a PID namespace of its own (every worker pid 1), and a live worker in one was
    taken for dead by a worker starting in another, its job handed to a third. Rows of older
    workers have none: no newer worker takes them for its own (their leases run out).
    """
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("pid_space", sa.String(length=64), nullable=True))


def downgrade() -> None:
    """Revert this revision."""
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.drop_column("pid_space")
